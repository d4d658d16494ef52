"""The Chronicle control API over httpx: one typed method per endpoint, each path written once.

Also here: auth, retries of idempotent calls, and the mapping of answers to typed errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from methodic._errors import (
    AssetIncompleteError,
    AuthenticationError,
    ChronicleError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ServerError,
)
from methodic._retry import (
    RetryPolicy,
    is_transient_exception,
    is_transient_status,
    retry_after_seconds,
)
from methodic._types import Asset, PresignedAsset, UploadTarget

log = logging.getLogger("methodic")


def resolve_server_url(server_url: str | None) -> str:
    url = server_url or os.environ.get("METHODIC_SERVER_URL")
    if not url:
        raise InvalidInputError(
            "no server URL: pass server_url= (or --server-url) or set METHODIC_SERVER_URL"
        )
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInputError(
            f"server URL {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8765"
        )
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str:
    key = api_key or os.environ.get("METHODIC_API_KEY")
    if not key:
        raise AuthenticationError(
            "no API key: pass api_key= (or --api-key) or set METHODIC_API_KEY; "
            "`methodic serve` writes its key to DATA_DIR/api_key"
        )
    return key


def error_message(response: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    """(code, message, body) from the server's one error shape, tolerating anything else."""
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return str(err.get("code", "")), str(err.get("message", "")), err
    except ValueError:
        pass
    return "", (response.text[:300] or response.reason_phrase), {}


def raise_for_response(response: httpx.Response, server_url: str) -> None:
    """Raise the typed error for a non-2xx answer (after retries are over)."""
    status = response.status_code
    if status < 400:
        return
    code, message, body = error_message(response)
    if status == 401:
        raise AuthenticationError(
            f"the server at {server_url} refused the API key ({message or 'unauthorized'}); "
            "pass the right key with --api-key or METHODIC_API_KEY"
        )
    if status == 404:
        raise NotFoundError(message or f"not found: {response.request.url.path}")
    if status == 409 and code == "asset_incomplete":
        items = body.get("missing", [])
        missing = [m["path"] if isinstance(m, dict) else str(m) for m in items]
        parts = {
            m["path"]: [int(n) for n in m["parts_missing"]]
            for m in items
            if isinstance(m, dict) and isinstance(m.get("parts_missing"), list)
        }
        reasons = {m["path"]: str(m.get("reason", "")) for m in items if isinstance(m, dict)}
        raise AssetIncompleteError(message or "asset is incomplete", missing, parts, reasons)
    if status == 409:
        raise ConflictError(message)
    if status in (400, 411, 413, 422):
        raise InvalidInputError(f"the server refused the request: {message}")
    raise ServerError(f"the server at {server_url} answered {status}: {message}", status)


@dataclass(frozen=True)
class DownloadTarget:
    """Where to GET one component of a finalized asset, and what it must be."""

    path: str
    url: str
    size: int
    sha256: str | None
    checksum: str | None = None  # "algo:value" the server settled at finalize
    part_size: int | None = None  # the layout ``checksum`` was derived over

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DownloadTarget:
        part_size = data.get("part_size")
        return cls(
            data["path"],
            data["url"],
            int(data["size"]),
            data.get("sha256"),
            data.get("checksum"),
            int(part_size) if part_size is not None else None,
        )


class ApiClient:
    """Calls the control API. Every call methodic makes is idempotent, so all are retried."""

    def __init__(
        self, server_url: str, api_key: str, http: httpx.AsyncClient, retry: RetryPolicy
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http = http
        self._retry = retry

    def __repr__(self) -> str:
        return f"ApiClient(server_url={self.server_url!r})"

    # ------------------------------------------------------------ experiments and runs

    async def create_experiment(self, name: str) -> str:
        """Create the experiment ``name`` (or find the existing one); returns its id."""
        data = await self._call("POST", "/experiments", json={"name": name})
        return str(data["id"])

    async def find_experiments(self, name: str) -> list[str]:
        """The ids of the experiments called ``name`` (none, or one)."""
        data = await self._call("GET", "/experiments", params={"name": name})
        return [str(e["id"]) for e in data["experiments"]]

    async def get_experiment(self, experiment_id: str) -> str:
        """The id of the experiment ``experiment_id``; raises ``NotFoundError`` when there is none."""
        data = await self._call("GET", f"/experiments/{quote(experiment_id, safe='')}")
        return str(data["id"])

    async def put_run(self, experiment_id: str, variation: int, run: int) -> dict[str, Any]:
        """Get or create run (variation, run) of an experiment: the run's JSON."""
        data: dict[str, Any] = await self._call(
            "PUT", f"/experiments/{experiment_id}/runs/{variation}/{run}"
        )
        return data

    async def get_run(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("GET", f"/runs/{run_id}")
        return data

    async def set_run_status(self, run_id: str, status: str) -> str:
        """Set the run's status; returns the status the server now holds."""
        data = await self._call("POST", f"/runs/{run_id}/status", json={"status": status})
        return str(data["status"])

    # ------------------------------------------------------------ assets

    async def create_asset(
        self,
        run_id: str,
        *,
        asset_id: str,
        asset_type: str,
        metadata: dict[str, Any],
        components: Sequence[dict[str, Any]],
        presign: bool = False,
        checksum_algorithm: str | None = None,
        brief: bool = False,
        contribution: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> PresignedAsset:
        """Create the pending asset from its full manifest (idempotent for the same id).

        With ``manifest`` (``component_count``, ``total_size`` and ``digest`` of the whole),
        ``components`` are its first entries; ``append_components`` lists the rest.

        With ``presign`` the answer carries an upload target for every component and part
        (not bound to digests). ``checksum_algorithm`` is asked for a new asset; the answer's
        ``checksum_algorithm`` is the asset's (an existing asset keeps its own). ``brief``: the
        answer's asset comes without its components.
        """
        body: dict[str, Any] = {
            "asset_id": asset_id,
            "asset_type": asset_type,
            "metadata": metadata,
            "components": list(components),
        }
        if checksum_algorithm is not None:
            body["checksum_algorithm"] = checksum_algorithm
        if contribution is not None:  # asset_name, rank, world_size (docs/distributed.md)
            body.update(contribution)
        if manifest is not None:
            body["manifest"] = manifest
        if presign:
            body["presign"] = True
        if brief:
            body["brief"] = True
        data = await self._call("POST", f"/runs/{run_id}/assets", json=body)
        targets = tuple(UploadTarget.from_json(t) for t in data.get("targets", ()))
        return PresignedAsset(asset_id, Asset.from_json(data), targets)

    async def append_components(self, asset_id: str, components: Sequence[dict[str, Any]]) -> Asset:
        """List more entries of a manifest a create declared; the asset's summary."""
        body = {"components": list(components)}
        return Asset.from_json(
            await self._call("POST", f"/assets/{quote(asset_id, safe='')}/components", json=body)
        )

    async def get_asset(self, asset_id: str) -> Asset:
        """The server's view of an asset, pending or not, with what storage already holds."""
        return Asset.from_json(await self._call("GET", f"/assets/{asset_id}"))

    async def list_assets(
        self, run_id: str, *, include_pending: bool = False, asset_type: str | None = None
    ) -> list[Asset]:
        params: dict[str, Any] = {"include_pending": str(include_pending).lower()}
        if asset_type:
            params["asset_type"] = asset_type
        data = await self._call("GET", f"/runs/{run_id}/assets", params=params)
        return [Asset.from_json(a) for a in data["assets"]]

    async def presign(
        self, asset_id: str, keys: Sequence[tuple[str, int | None, str]]
    ) -> list[UploadTarget]:
        """Upload targets for these (path, part, hex digest) ranges of a pending asset, in one
        call; each target is bound to its digest (the receiver refuses other bytes)."""
        data = await self._call(
            "POST",
            f"/assets/{asset_id}/presign",
            json={"targets": [{"path": p, "part": n, "checksum": d} for p, n, d in keys]},
        )
        return [UploadTarget.from_json(t) for t in data["targets"]]

    async def finalize(
        self,
        asset_id: str,
        checksums: dict[str, str] | None = None,
        rank: int | None = None,
        brief: bool = False,
    ) -> Asset:
        """Flip the asset to finalized once storage holds every component; idempotent.

        With ``rank`` (a multi-rank asset): store that rank's contribution; the answer is
        finalized once every rank's is. Raises ``AssetIncompleteError`` listing what storage lacks.
        ``brief``: the answer's asset has no components, only their ``components_fingerprint``
        (None from a server that answered with the components, which the asset then holds).
        """
        body: dict[str, Any] = {"checksums": checksums or {}}
        if rank is not None:
            body["rank"] = rank
        if brief:
            body["brief"] = True
        return Asset.from_json(await self._call("POST", f"/assets/{asset_id}/finalize", json=body))

    async def asset_summary(self, asset_id: str) -> Asset:
        """The asset without its components, with a multi-rank asset's contributions."""
        data = await self._call("GET", f"/assets/{asset_id}", params={"components": "false"})
        return Asset.from_json(data)

    async def set_retention(self, run_id: str, asset_type: str, keep_last: int) -> list[str]:
        """Keep the run's newest ``keep_last`` finalized assets of the type; the ids deleted now."""
        data = await self._call(
            "PUT",
            f"/runs/{run_id}/retention",
            json={"asset_type": asset_type, "keep_last": keep_last},
        )
        return [str(a) for a in data["deleted"]]

    async def delete_asset(self, asset_id: str) -> None:
        """Abort a pending asset: the server forgets it and removes its bytes."""
        await self._call("DELETE", f"/assets/{asset_id}")

    async def download_targets(self, asset_id: str) -> list[DownloadTarget]:
        """Where to GET each component of a finalized asset."""
        data = await self._call("GET", f"/assets/{asset_id}/download")
        return [DownloadTarget.from_json(c) for c in data["components"]]

    # ------------------------------------------------------------ uploader sessions

    async def beat(self, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Register or refresh an uploader session; the answer carries commands for it."""
        data: dict[str, Any] = await self._call(
            "POST", f"/sessions/{quote(session_id, safe='')}/beat", json=body
        )
        return data

    async def list_sessions(
        self, experiment_id: str | None = None, run: int | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if experiment_id is not None:
            params["experiment_id"] = experiment_id
        if run is not None:
            params["run"] = run
        data = await self._call("GET", "/sessions", params=params)
        return list(data["sessions"])

    async def send_command(self, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
        """Queue a command for a session (idempotent: the command carries its id)."""
        data: dict[str, Any] = await self._call(
            "POST", f"/sessions/{quote(session_id, safe='')}/commands", json=command
        )
        return data

    async def get_command(self, session_id: str, command_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call(
            "GET",
            f"/sessions/{quote(session_id, safe='')}/commands/{quote(command_id, safe='')}",
        )
        return data

    # ------------------------------------------------------------ transport

    async def _call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        url = f"{self.server_url}/api/v1{path}"
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            delay: float | None = None
            try:
                response = await self._http.request(
                    method, url, json=json, params=params, headers=self._headers
                )
            except httpx.TransportError as exc:
                if not is_transient_exception(exc) or not self._may_retry(attempt, started):
                    raise ServerError(
                        f"cannot reach the server at {self.server_url} ({type(exc).__name__}: {exc}); "
                        "check that it is running and that --server-url is right"
                    ) from None
                cause = f"{type(exc).__name__}"
            else:
                if not is_transient_status(response.status_code) or not self._may_retry(
                    attempt, started
                ):
                    raise_for_response(response, self.server_url)
                    return response.json() if response.content else None
                cause = f"HTTP {response.status_code}"
                delay = retry_after_seconds(response)
            wait = self._retry.delay(attempt, delay)
            log.info("retrying %s %s in %.2fs after %s", method, path, wait, cause)
            await asyncio.sleep(wait)

    def _may_retry(self, attempt: int, started: float) -> bool:
        return (
            attempt < self._retry.max_attempts
            and time.monotonic() - started < self._retry.max_elapsed
        )


__all__ = ["ApiClient", "ChronicleError", "DownloadTarget", "raise_for_response"]
