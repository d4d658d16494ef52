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
    specs: list[ComponentSpec] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise InvalidInputError(
                    f"{here / d} is a symlinked directory; copy it in or remove the link"
                )
        dirnames.sort()
        # Paths as strings, per file: pathlib's parsing was most of a 10,000-file scan.
        prefix = "" if here == root else here.relative_to(root).as_posix() + "/"
        for name in sorted(filenames):
            rel = prefix + name
            if (include is None or matches(rel, include)) and not matches(rel, exclude or ()):
                specs.append(_component(root, real_root, os.path.join(dirpath, name), rel))
    if not specs:
        if include is not None or exclude:
            raise InvalidInputError(
                f"no file under {root} is kept by include={list(include or [])!r} "
                f"exclude={list(exclude or [])!r}: there is nothing to upload"
            )
        raise InvalidInputError(f"{root} is empty: there is nothing to upload")
    return specs


def _walk_error(exc: OSError) -> None:
    raise InvalidInputError(f"{exc.filename}: cannot list it ({exc.strerror})")


def _component(root: Path, real_root: Path, path: str, rel: str) -> ComponentSpec:
    if os.path.islink(path):
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
        with open(path, "rb"):
            pass
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
