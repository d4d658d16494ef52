"""Downloading a finalized asset: every component to a temporary file, checked, then renamed.

Nothing is written outside the destination: the manifest's paths are checked before any byte
is written (relative, no ``..``, no duplicates, no path that is both a file and a directory),
and every directory below the destination is walked by file descriptor without following a
symlink, so a link already inside the destination cannot lead out of it. Temporary names are
short (``.methodic-<8 hex>.part``), so a 255-byte file name can still be restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import httpx

from methodic import _checksum as checksums
from methodic._api import ApiClient, DownloadTarget, raise_for_response
from methodic._errors import ChronicleError
from methodic._paths import component_path_problem
from methodic._transfer import CHUNK_SIZE

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


async def download_asset(
    api: ApiClient, http: httpx.AsyncClient, asset_id: str, dest: Path, *, concurrency: int
) -> Path:
    """Write a byte-identical copy of a finalized asset under ``dest``; returns it."""
    targets = await api.download_targets(asset_id)
    check_manifest(asset_id, [t.path for t in targets])
    try:
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise ChronicleError(
            f"cannot create the download destination {dest}: {exc.strerror}"
        ) from None
    limit = asyncio.Semaphore(concurrency)

    async def one(target: DownloadTarget) -> None:
        async with limit:
            await _download_component(http, target, dest, api.server_url)

    await asyncio.gather(*(one(t) for t in targets))
    return dest


def check_manifest(asset_id: str, paths: Sequence[str]) -> None:
    """Refuse a manifest that would write outside the destination or clash with itself."""
    files: set[str] = set()
    dirs: set[str] = set()
    for path in paths:
        problem = component_path_problem(path)
        if problem:
            raise ChronicleError(
                f"asset {asset_id}: the server sent a component path {path!r} that {problem}; "
                "refusing to download it (nothing was written)"
            )
        if path in files:
            raise ChronicleError(
                f"asset {asset_id}: the server listed {path!r} twice; "
                "refusing to download it (nothing was written)"
            )
        files.add(path)
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(files & dirs)
    if clash:
        raise ChronicleError(
            f"asset {asset_id}: the server listed {clash[0]!r} both as a file and as a directory; "
            "refusing to download it (nothing was written)"
        )


def _open_parent(dest: Path, path: str) -> int:
    """A descriptor of the directory that will hold ``path``, created below ``dest`` as needed.

    Each level is opened with O_NOFOLLOW: a symlink (or a file) where a directory should be is
    refused, never followed out of the destination.
    """
    fd = os.open(dest, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for segment in path.split("/")[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(segment, 0o777, dir_fd=fd)
            try:
                child = os.open(segment, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ChronicleError(
                        f"cannot download {path}: {segment!r} in {dest} is a symlink or a file, "
                        "not a directory; methodic never writes through a link. Move it aside "
                        "or download into an empty directory"
                    ) from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


async def _download_component(
    http: httpx.AsyncClient, target: DownloadTarget, dest: Path, server_url: str
) -> None:
    path = target.path
    name = path.rsplit("/", 1)[-1]
    tmp = f".methodic-{secrets.token_hex(4)}.part"
    try:
        parent = await asyncio.to_thread(_open_parent, dest, path)
    except OSError as exc:
        raise ChronicleError(f"cannot download {path} into {dest}: {exc.strerror}") from None
    try:
        verifiers = _verifiers(target)
        size = 0
        async with http.stream("GET", target.url) as response:
            if response.status_code >= 300:
                await response.aread()
                raise_for_response(response, server_url)
            fd = await asyncio.to_thread(os.open, tmp, _TMP_FLAGS, 0o666, dir_fd=parent)
            try:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    size += len(chunk)
                    if size > target.size:  # never write more than the component has
                        raise ChronicleError(
                            f"download of {path}: the server sent more than its {target.size} "
                            "bytes; nothing was kept"
                        )
                    await asyncio.to_thread(_write_hashed, fd, chunk, verifiers)
            except BaseException:
                await asyncio.to_thread(_discard, fd, tmp, parent)
                raise
            await asyncio.to_thread(os.close, fd)
        wrong = [v for v in verifiers if v.value() != v.want] if size == target.size else []
        if size != target.size or wrong:
            await asyncio.to_thread(_unlink, tmp, parent)
            what = (
                f"{size} bytes arrived, it has {target.size}"
                if size != target.size
                else f"its {wrong[0].algorithm} is {wrong[0].value()}, the server published "
                f"{wrong[0].want}"
            )
            raise ChronicleError(f"download of {path} was corrupt ({what}); nothing was kept")
        try:
            # rename() replaces a symlink at the final name itself, never what it points to.
            await asyncio.to_thread(os.replace, tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            await asyncio.to_thread(_unlink, tmp, parent)
            raise ChronicleError(
                f"cannot download {path} into {dest}: {exc.strerror} "
                "(is a directory in the way? download into an empty directory)"
            ) from None
    except OSError as exc:
        raise ChronicleError(f"cannot download {path} into {dest}: {exc.strerror}") from None
    finally:
        os.close(parent)


def _verifiers(target: DownloadTarget) -> list[checksums.StreamVerifier]:
    """What the bytes of a component must hash to: its settled checksum, and the sha256 its
    uploader declared, when known."""
    out = []
    if target.checksum is not None:
        out.append(checksums.StreamVerifier(target.checksum, target.size, target.part_size))
    if target.sha256 and target.checksum != f"sha256:{target.sha256}":
        out.append(checksums.StreamVerifier(f"sha256:{target.sha256}", target.size, None))
    return out


def _write_hashed(fd: int, data: bytes, verifiers: list[checksums.StreamVerifier]) -> None:
    for v in verifiers:
        v.update(data)
    _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _discard(fd: int, name: str, dir_fd: int) -> None:
    os.close(fd)
    _unlink(name, dir_fd)
