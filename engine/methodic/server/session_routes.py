"""The uploader-session routes (docs/monitor.md): beats in, sessions and commands out.

They run on the event loop (no thread hop): each is a few dict operations under the book's
lock, and a beat is the hottest control route when a thousand uploaders beat every 2 s.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from methodic.server.errors import APIError, too_large
from methodic.server.sessions import SessionBook

MAX_BEAT_BYTES = 4 * 1024 * 1024


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BEAT_BYTES:
        raise too_large(f"a beat or command is at most {MAX_BEAT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise APIError(422, "invalid_request", "the body is not JSON") from None


def session_routes(router: APIRouter, book: SessionBook) -> None:
    @router.post("/sessions/{session_id}/beat", tags=["sessions"])
    async def beat(session_id: str, request: Request) -> Response:
        return JSONResponse(book.beat(session_id, await _json_body(request)))

    @router.get("/sessions", tags=["sessions"])
    async def list_sessions(
        experiment_id: str | None = None, run: Annotated[int | None, Query(ge=0)] = None
    ) -> Response:
        return JSONResponse({"sessions": book.list(experiment_id, run)})

    @router.get("/sessions/{session_id}", tags=["sessions"])
    async def get_session(session_id: str) -> Response:
        return JSONResponse(book.get(session_id))

    @router.post("/sessions/{session_id}/commands", status_code=201, tags=["sessions"])
    async def send_command(session_id: str, request: Request) -> Response:
        command, created = book.send(session_id, await _json_body(request))
        return JSONResponse(command, status_code=201 if created else 200)

    @router.get("/sessions/{session_id}/commands/{command_id}", tags=["sessions"])
    async def get_command(session_id: str, command_id: str) -> Response:
        return JSONResponse(book.command(session_id, command_id))
