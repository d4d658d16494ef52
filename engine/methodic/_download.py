"""Downloading a finalized asset: every component to a temporary file, checked, then renamed."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx

from methodic._api import ApiClient, DownloadTarget, raise_for_response
from methodic._errors import ChronicleError
from methodic._paths import component_path_problem
from methodic._transfer import CHUNK_SIZE


async def download_asset(
    api: ApiClient, http: httpx.AsyncClient, asset_id: str, dest: Path, *, concurrency: int
) -> Path:
    """Write a byte-identical copy of a finalized asset under ``dest``; returns it."""
    targets = await api.download_targets(asset_id)
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    limit = asyncio.Semaphore(concurrency)

    async def one(target: DownloadTarget) -> None:
        async with limit:
            await _download_component(http, target, dest, api.server_url)

    await asyncio.gather(*(one(t) for t in targets))
    return dest


async def _download_component(
    http: httpx.AsyncClient, target: DownloadTarget, dest: Path, server_url: str
) -> None:
    path = target.path
    problem = component_path_problem(path)
    if problem:
        raise ChronicleError(
            f"the server sent a component path {path!r} that {problem}; refusing to write it"
        )
    final = dest / path
    tmp = final.with_name(f".{final.name}.methodic-partial")
    await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    size = 0
    async with http.stream("GET", target.url) as response:
        if response.status_code >= 300:
            await response.aread()
            raise_for_response(response, server_url)
        f = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for chunk in response.aiter_bytes(CHUNK_SIZE):
                hasher.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.close)
    if size != target.size or (target.sha256 and hasher.hexdigest() != target.sha256):
        tmp.unlink(missing_ok=True)
        raise ChronicleError(f"download of {path} was corrupt (size or sha256 differs); try again")
    await asyncio.to_thread(os.replace, tmp, final)
