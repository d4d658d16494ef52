"""The one error shape of the HTTP API: ``{"error": {"code", "message", ...extra}}``.

Starlette-only (no FastAPI), so the blob data path can use it outside the control app.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

from starlette.responses import JSONResponse

CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    422: "invalid_request",
    507: "insufficient_storage",
}
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}


def invalid(message: str, **extra: Any) -> APIError:
    return APIError(400, "invalid_request", message, **extra)


def not_found(message: str) -> APIError:
    return APIError(404, "not_found", message)


def conflict(message: str, **extra: Any) -> APIError:
    return APIError(409, "conflict", message, **extra)


def too_large(message: str) -> APIError:
    return APIError(413, "too_large", message)


def unauthorized() -> APIError:
    error = APIError(
        401,
        "unauthorized",
        "missing or wrong API key: send 'Authorization: Bearer sk_agent_...' "
        "(a generated key is in the server's DATA_DIR/api_key)",
    )
    error.headers["WWW-Authenticate"] = "Bearer"
    return error


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


def insufficient_storage() -> APIError:
    return APIError(
        507,
        "insufficient_storage",
        "the server's disk is full (no space or quota left in its data directory); retry later",
    )


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or a quota is full:
    an OSError ENOSPC/EDQUOT, or SQLite's SQLITE_FULL ("database or disk is full")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def forbidden(message: str) -> APIError:
    return APIError(403, "forbidden", message)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers or None, **exc.extra)
