"""scan_directory and the component path rules, without a server: the order of what a scan
finds, every refusal and its message, and the plain-path fast path against the full check."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from methodic import ComponentSpec, InvalidInputError, UploadTracker, scan_directory
from methodic import _tracker_ops as ops
from methodic._paths import (
    MAX_PATH_LENGTH,
    MAX_SEGMENT_LENGTH,
    _full_path_problem,
    component_path_problem,
    is_plain_path,
)


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_each_directory_s_files_come_before_its_subdirectories_each_by_name(
    tmp_path: Path,
) -> None:
    rels = ["b/z", "b/a/y", "a", "c/b", "b/x", "é.bin", ".hidden", "B", "b/a/x/w"]
    root = tree(tmp_path / "ckpt", {rel: rel.encode() for rel in rels})
    specs = scan_directory(root)
    assert [s.path for s in specs] == [
        ".hidden",
        "B",
        "a",
        "é.bin",
        "b/x",
        "b/z",
        "b/a/y",
        "b/a/x/w",
        "c/b",
    ]
    for s in specs:
        st_ = os.stat(root / s.path)
        assert s == ComponentSpec(
            s.path,
            os.path.join(root, s.path),
            st_.st_size,
            mtime_ns=st_.st_mtime_ns,
            inode=st_.st_ino,
            ctime_ns=st_.st_ctime_ns,
            device=st_.st_dev,
        )


def test_include_and_exclude_choose_files_and_say_when_none_is_left(tmp_path: Path) -> None:
    root = tree(tmp_path / "ckpt", {"a.bin": b"1", "d/b.bin": b"2", "d/c.txt": b"3"})
    assert [s.path for s in scan_directory(root, include=["*.bin"])] == ["a.bin", "d/b.bin"]
    assert [s.path for s in scan_directory(root, exclude=["d/*"])] == ["a.bin"]
    assert [s.path for s in scan_directory(root, exclude=[])] == ["a.bin", "d/b.bin", "d/c.txt"]
    with pytest.raises(InvalidInputError, match=r"no file under .* is kept by include=\['\*\.x'\]"):
        scan_directory(root, include=["*.x"])
    with pytest.raises(InvalidInputError, match="include must be a list"):
        scan_directory(root, include="*.bin")


def test_a_symlink_to_a_file_inside_is_kept_under_its_own_name(tmp_path: Path) -> None:
    root = tree(tmp_path / "ckpt", {"real.bin": b"r" * 10})
    (root / "alias.bin").symlink_to(root / "real.bin")
    (alias, real) = scan_directory(root)
    assert (alias.path, alias.local_path, alias.size) == ("alias.bin", str(root / "alias.bin"), 10)
    assert alias.inode == real.inode


@pytest.mark.parametrize("case", ["symlinked dir", "dangling", "outside", "fifo", "bad path"])
def test_what_cannot_be_uploaded_is_refused_by_name(tmp_path: Path, case: str) -> None:
    root = tree(tmp_path / "ckpt", {"ok.bin": b"1", "sub/ok.bin": b"2"})
    if case == "symlinked dir":
        (tmp_path / "elsewhere").mkdir()
        (root / "sub" / "linked").symlink_to(tmp_path / "elsewhere")
        expected = f"{root / 'sub' / 'linked'} is a symlinked directory"
    elif case == "dangling":
        (root / "sub" / "link").symlink_to(tmp_path / "nowhere")
        expected = f"{root / 'sub' / 'link'} is a symlink to {tmp_path / 'nowhere'}, which does not"
    elif case == "outside":
        (tmp_path / "secret").write_text("s")
        (root / "sub" / "link").symlink_to(tmp_path / "secret")
        expected = f"{root / 'sub' / 'link'} is a symlink to {tmp_path / 'secret'}, outside {root}"
    elif case == "fifo":
        os.mkfifo(root / "sub" / "pipe")
        expected = f"{root / 'sub' / 'pipe'} is not a regular file"
    else:
        (root / "sub" / "a\\b").write_bytes(b"3")
        bad = str(root / "sub" / "a\\b")
        expected = f"{bad}: its path {'sub/a' + chr(92) + 'b'!r} contains a backslash"
    with pytest.raises(InvalidInputError) as info:
        scan_directory(root)
    assert str(info.value).startswith(expected), str(info.value)


def test_a_file_that_cannot_be_opened_or_a_directory_that_cannot_be_listed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite runs as root, whom a file's mode does not stop: the refusal is made here."""
    root = tree(tmp_path / "ckpt", {"ok.bin": b"1", "sub/locked.bin": b"2"})
    locked = str(root / "sub" / "locked.bin")
    real_open, real_scandir = os.open, os.scandir

    def no_open(path: str, flags: int, *args: int) -> int:
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args)

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_open)
        with pytest.raises(InvalidInputError, match=f"^{locked}: cannot read it \\(Permission"):
            scan_directory(root)

    def no_listing(path: str) -> Any:
        if os.fspath(path) == str(root / "sub"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", no_listing)
    with pytest.raises(InvalidInputError, match=f"^{root / 'sub'}: cannot list it \\(Permission"):
        scan_directory(root)


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "f00001.bin",
        "global_step1000/mp_rank_00/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "a-b+c=d,e@f~g%h.i_j",
        "x" * MAX_SEGMENT_LENGTH,
        "/".join(["y" * 200] * 5)[:MAX_PATH_LENGTH],
    ],
)
def test_plain_paths_are_valid_at_once(path: str) -> None:
    assert is_plain_path(path) and _full_path_problem(path) is None


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "..",
        "a/../b",
        "a/./b",
        "/a",
        "a/",
        "a//b",
        "a\\b",
        "a\x00b",
        "x" * (MAX_SEGMENT_LENGTH + 1),
        "a/" * (MAX_PATH_LENGTH // 2) + "a",
        # valid, but not plain: the full check says so
        ".hidden",
        "a/.b",
        "é.bin",
        "a b",
        "a\n",
    ],
)
def test_other_paths_get_the_full_check(path: str) -> None:
    assert not is_plain_path(path)
    assert component_path_problem(path) == _full_path_problem(path)


_PIECES = st.sampled_from(["a", "Z", "0", "_", "~", ".", "..", "/", "-", "\\", "\x00", "é", " "])


@given(parts=st.lists(st.one_of(_PIECES, st.just("x" * 300)), max_size=12))
def test_the_fast_path_never_lets_through_what_the_full_check_refuses(parts: list[str]) -> None:
    path = "".join(parts)
    assert component_path_problem(path) == _full_path_problem(path)
    if is_plain_path(path):
        assert _full_path_problem(path) is None


def test_the_tracker_still_checks_every_caller_s_specs(tmp_path: Path) -> None:
    t = UploadTracker(tmp_path / "u.sqlite")
    f = tmp_path / "f"
    f.write_bytes(b"1")
    for bad, message in (
        ([], "no components"),
        ([ComponentSpec("a/../b", f, 1)], "'a/../b' has a '..' segment"),
        ([ComponentSpec("a", f, 1), ComponentSpec("a", f, 1)], "appears twice"),
        ([ComponentSpec("a", f, -1)], "size must be"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            t.register_components("A", bad, asset_type="checkpoint")
    assert t.list_assets() == []


def test_a_scan_registered_unchecked_writes_the_same_rows(tmp_path: Path) -> None:
    root = tree(tmp_path / "ckpt", {"a": b"1" * 3, "d/b": b"2" * 5})
    specs = scan_directory(root)
    checked = UploadTracker(tmp_path / "checked.sqlite")
    checked.register_components("A", specs, asset_type="checkpoint")
    scanned = UploadTracker(tmp_path / "scanned.sqlite")
    scanned._execute(
        ops.register(
            "A",
            specs,
            asset_type="checkpoint",
            seal=True,
            metadata={},
            validated=True,
            part_sizes={"d/b": 4},
        )
    )

    def rows(t: UploadTracker) -> list[tuple[object, ...]]:
        with sqlite3.connect(t.db_path) as conn:
            return conn.execute("SELECT * FROM components ORDER BY path").fetchall()

    want = [(*r[:7], 4 if r[1] == "d/b" else None, *r[8:]) for r in rows(checked)]
    assert rows(scanned) == want and len(want) == 2
