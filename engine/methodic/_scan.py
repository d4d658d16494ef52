"""Turn a checkpoint directory into its component list, refusing anything that would surprise."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from methodic import _checksum as checksums
from methodic._errors import InvalidInputError
from methodic._paths import component_path_problem
from methodic._types import ComponentSpec


def matches(rel: str, patterns: Sequence[str]) -> bool:
    """Whether the relative POSIX path ``rel`` matches a glob: a pattern without ``/`` matches
    a file's name at any depth; one with ``/`` matches the whole path (``*`` may cross ``/``)."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatchcase(rel if "/" in p else name, p) for p in patterns)


def scan_directory(
    local_dir: Path | str,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[ComponentSpec]:
    """One component per regular file under ``local_dir`` (recursive), paths relative and POSIX.

    With ``include``, only files matching one of its globs; never those matching ``exclude``
    (see ``matches``). Refused before anything is registered: a missing path, a file instead
    of a directory, nothing left to upload, a file that cannot be read, a symlink that leaves
    the directory or points nowhere, a symlinked directory, and special files (FIFOs, sockets,
    devices) among the files kept.
    """
    for name, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str) or (
            patterns is not None and not all(isinstance(p, str) and p for p in patterns)
        ):
            raise InvalidInputError(
                f"{name} must be a list of non-empty glob strings, e.g. ['*.distcp'], "
                f"not {patterns!r}"
            )
    root = Path(local_dir).expanduser()
    if not root.exists():
        raise InvalidInputError(
            f"{root}: no such directory; pass the checkpoint directory to upload"
        )
    if not root.is_dir():
        raise InvalidInputError(
            f"{root} is a file, not a directory; pass its directory, or use upload_asset() for one file"
        )
    real_root = root.resolve()
    keep_all = include is None and not exclude
    specs: list[ComponentSpec] = []
    # Depth first, each directory's files (by name) before its subdirectories (by name), as
    # os.walk(topdown) visits them; os.scandir's entries say which are links and directories
    # without a stat (from d_type), and their .path is the same string os.walk would join.
    pending: list[tuple[str, str]] = [(os.fspath(root), "")]
    while pending:
        top, prefix = pending.pop()
        files, dirs = _listing(top)
        for d in dirs:
            if _is_link(d):
                raise InvalidInputError(
                    f"{d.path} is a symlinked directory; copy it in or remove the link"
                )
        for f in files:
            rel = prefix + f.name
            if keep_all or (
                (include is None or matches(rel, include)) and not matches(rel, exclude or ())
            ):
                specs.append(_component(root, real_root, f.path, rel, _is_link(f)))
        pending.extend((d.path, f"{prefix}{d.name}/") for d in reversed(dirs))
    if not specs:
        if include is not None or exclude:
            raise InvalidInputError(
                f"no file under {root} is kept by include={list(include or [])!r} "
                f"exclude={list(exclude or [])!r}: there is nothing to upload"
            )
        raise InvalidInputError(f"{root} is empty: there is nothing to upload")
    return specs


def _listing(top: str) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]]:
    """The files and the directories (a link to one included) in ``top``, each by name."""
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=_name)
    except OSError as exc:
        raise InvalidInputError(f"{exc.filename}: cannot list it ({exc.strerror})") from None
    files: list[os.DirEntry[str]] = []
    dirs: list[os.DirEntry[str]] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:  # as os.walk: what cannot be told a directory is listed as a file
            is_dir = False
        (dirs if is_dir else files).append(entry)
    return files, dirs


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _is_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()
    except OSError:  # as os.path.islink: gone since it was listed (os.stat then says so)
        return False


def _component(root: Path, real_root: Path, path: str, rel: str, link: bool) -> ComponentSpec:
    if link:
        target = Path(path).resolve()
        if not target.exists():
            raise InvalidInputError(
                f"{path} is a symlink to {os.readlink(path)}, which does not exist"
            )
        if not target.is_relative_to(real_root):
            raise InvalidInputError(
                f"{path} is a symlink to {target}, outside {root}; copy the file in instead"
            )
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(
                f"{path} is not a regular file (a FIFO, socket or device); remove it"
            )
        # Opened as open() would (O_RDONLY), without building a Python file object.
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read it ({exc.strerror})") from None
    problem = component_path_problem(rel)
    if problem:
        raise InvalidInputError(f"{path}: its path {rel!r} {problem}")
    return ComponentSpec.from_stat(rel, path, st)


def validate_specs(asset_id: str, components: Sequence[ComponentSpec]) -> None:
    """Refuse an empty list, bad or duplicate paths and negative sizes, naming the culprit."""
    if not components:
        raise InvalidInputError(f"asset {asset_id}: no components to register")
    seen: set[str] = set()
    for c in components:
        problem = component_path_problem(c.path)
        if problem:
            raise InvalidInputError(f"component path {c.path!r} {problem}")
        if c.path in seen:
            raise InvalidInputError(f"component path {c.path!r} appears twice in asset {asset_id}")
        seen.add(c.path)
        if not isinstance(c.size, int) or c.size < 0:
            raise InvalidInputError(f"component {c.path!r}: size must be a whole number >= 0")
        if c.sha256 is not None and c.checksum is not None:
            raise InvalidInputError(
                f"component {c.path!r}: give sha256= or checksum=, not both "
                "(checksum='sha256:<hex>' says the same)"
            )
        if (declared := c.declared) is not None:
            try:
                _algorithm, value = checksums.parse(declared)
            except checksums.ChecksumFormatError as exc:
                raise InvalidInputError(f"component {c.path!r}: {exc}") from None
            if "-" in value:
                raise InvalidInputError(
                    f"component {c.path!r}: checksum {declared!r} is a composite of parts; "
                    "give the digest of the whole file"
                )
