"""The Chronicle control API over httpx: auth, retries of idempotent calls, the error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

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

log = logging.getLogger("methodic")


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
        missing = [m["path"] if isinstance(m, dict) else str(m) for m in body.get("missing", [])]
        raise AssetIncompleteError(message or "asset is incomplete", missing)
    if status == 409:
        raise ConflictError(message)
    if status in (400, 411, 413, 422):
        raise InvalidInputError(f"the server refused the request: {message}")
    raise ServerError(f"the server at {server_url} answered {status}: {message}", status)


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

    async def call(
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


__all__ = ["ApiClient", "ChronicleError", "raise_for_response"]
