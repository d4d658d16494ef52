"""The Chronicle control API (docs/http-api.md) as a FastAPI app; blob bytes go to blobs/listener.py."""

from __future__ import annotations

import logging
import sqlite3
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from methodic import __version__
from methodic.server import models as m
from methodic.server.blobs.service import blob_origin, misdirected_route
from methodic.server.bulk import parse_asset_create, parse_components_append, render_json
from methodic.server.catalog import Catalog
from methodic.server.config import ServerConfig
from methodic.server.errors import (
    CODES,
    APIError,
    api_error_response,
    disk_full,
    error_response,
    insufficient_storage,
    too_large,
    unauthorized,
)
from methodic.server.finalize import Finalizer
from methodic.server.keys import KeyRing
from methodic.server.session_routes import session_routes
from methodic.server.state import ServerState, open_state
from methodic.server.storage.base import StorageUnavailable

log = logging.getLogger("methodic.server")

# Every control route may answer these (503: the storage, e.g. S3, did not answer; retry).
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": m.ErrorResponse} for status in (400, 401, 404, 409, 413, 422, 503)
}


# Routes anyone may call. Blob routes carry their own presigned signature.
_OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
_SIGNED_PREFIX = "/blobs/"


class _ControlGate:
    """Checks the API key and the body limit of every request before a byte of body is read.

    (FastAPI reads and parses a body before it runs dependencies, so an unauthenticated client
    could otherwise make the server parse a 256 MiB manifest.) Only /healthz, the OpenAPI
    document and the presigned blob routes pass without a key; /docs and unknown paths too
    answer 401, so nothing about the server is learnt without the key.
    """

    def __init__(self, app: ASGIApp, keyring: KeyRing, max_bytes: int) -> None:
        self.app = app
        self.keyring = keyring
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in _OPEN_PATHS or path.startswith(_SIGNED_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal: APIError | None = None
        headers = dict(scope["headers"])
        if not self.keyring.verify(_bearer_token(headers.get(b"authorization", b""))):
            refusal = unauthorized()
        else:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                refusal = self._too_large()
        if refusal is not None:
            await api_error_response(refusal)(scope, receive, send)
            return
        total = 0

        async def counting_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions met while reading a body.
                    raise StarletteHTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> APIError:
        return too_large(f"the request body is over this server's limit of {self.max_bytes} bytes")


def _bearer_token(header: bytes) -> str | None:
    scheme, _, token = header.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# Module level: FastAPI resolves the (postponed) annotations of endpoints in module globals.
_bearer = HTTPBearer(auto_error=False, description="An sk_agent_... API key")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the offending input: it may be a huge manifest.
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()[:20]
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"])
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return error_response(422, "invalid_request", message, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return error_response(
            exc.status_code, CODES.get(exc.status_code, "error"), message, headers
        )

    @app.exception_handler(StorageUnavailable)
    async def _storage(request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "storage_unavailable",
            f"the server's storage did not answer ({exc}); retry shortly",
            {"Retry-After": "2"},
        )

    # Handled here, not by the catch-all below: starlette re-raises what reaches the catch-all
    # after answering, so the server would log a traceback for a full disk.
    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _disk(request: Request, exc: Exception) -> JSONResponse:
        if disk_full(exc):
            log.warning("%s %s: the disk is full (507): %s", request.method, request.url.path, exc)
            return api_error_response(insufficient_storage())
        return _internal_error(request, exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        if disk_full(exc):
            return await _disk(request, exc)
        return _internal_error(request, exc)


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error; see the server's log")


def _origin(config: ServerConfig, request: Request) -> str:
    """Where presigned blob URLs point: the blob listener (docs/http-api.md, Blobs)."""
    return blob_origin(config, str(request.base_url), request.app.state.blob_port)


def _api_router(state: ServerState) -> APIRouter:
    config, catalog = state.config, state.catalog

    async def require_key(credentials: _Credentials) -> None:
        if credentials is None or not state.keyring.verify(credentials.credentials):
            raise unauthorized()

    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_key)], responses=_ERRORS)
    _experiment_routes(router, catalog)
    _run_routes(router, catalog)
    _asset_routes(router, catalog, state.finalizer, config)
    session_routes(router, state.sessions)

    @router.put("/runs/{run_id}/retention", response_model=m.Retention, tags=["runs"])
    def set_retention(run_id: str, body: m.RetentionSet) -> Response:
        return JSONResponse(state.retention.set(catalog, run_id, body.asset_type, body.keep_last))

    return router


def _experiment_routes(router: APIRouter, catalog: Catalog) -> None:
    @router.post(
        "/experiments",
        status_code=201,
        response_model=m.Experiment,
        tags=["experiments"],
        responses={
            200: {"model": m.Experiment, "description": "An experiment with that name exists"}
        },
    )
    def create_experiment(body: m.ExperimentCreate) -> Response:
        experiment, created = catalog.get_or_create_experiment(body.name)
        return JSONResponse(experiment, status_code=201 if created else 200)

    @router.get("/experiments", response_model=m.ExperimentList, tags=["experiments"])
    def list_experiments(name: str | None = None) -> Response:
        return JSONResponse({"experiments": catalog.list_experiments(name)})

    @router.get("/experiments/{experiment_id}", response_model=m.Experiment, tags=["experiments"])
    def get_experiment(experiment_id: str) -> Response:
        return JSONResponse(catalog.get_experiment(experiment_id))


def _run_routes(router: APIRouter, catalog: Catalog) -> None:
    @router.put(
        "/experiments/{experiment_id}/runs/{variation}/{run}",
        status_code=201,
        response_model=m.Run,
        tags=["runs"],
        responses={200: {"model": m.Run, "description": "The run exists"}},
    )
    def get_or_create_run(
        experiment_id: str,
        variation: Annotated[int, Path(ge=0, le=2**62)],
        run: Annotated[int, Path(ge=0, le=2**62)],
    ) -> Response:
        row, created = catalog.get_or_create_run(experiment_id, variation, run)
        return JSONResponse(row, status_code=201 if created else 200)

    @router.get("/runs/{run_id}", response_model=m.Run, tags=["runs"])
    def get_run(run_id: str) -> Response:
        return JSONResponse(catalog.get_run(run_id))

    @router.post("/runs/{run_id}/status", response_model=m.Run, tags=["runs"])
    def set_run_status(run_id: str, body: m.RunStatusUpdate) -> Response:
        return JSONResponse(catalog.set_run_status(run_id, body.status))


def _asset_routes(
    router: APIRouter, catalog: Catalog, finalizer: Finalizer, config: ServerConfig
) -> None:
    def create(run_id: str, body: bytes, origin: str) -> Response:
        spec = parse_asset_create(body, config.max_components_per_asset)
        asset, created = catalog.create_asset(run_id, spec)
        if spec.presign:
            if asset["state"] == "pending":
                targets, remaining = catalog.presign_first(
                    spec.asset_id, origin, config.max_presign_batch
                )
            else:
                targets, remaining = [], 0
            asset["targets"], asset["targets_remaining"] = targets, remaining
        return Response(
            render_json(asset), status_code=201 if created else 200, media_type="application/json"
        )

    @router.post(
        "/runs/{run_id}/assets",
        status_code=201,
        response_model=m.Asset,
        tags=["assets"],
        responses={200: {"model": m.Asset, "description": "The asset exists with this manifest"}},
        openapi_extra={"requestBody": _json_body(m.AssetCreate)},
    )
    async def create_asset(run_id: str, request: Request) -> Response:
        # The body is parsed, validated and stored on a worker thread, in slices: a big
        # manifest must not stall the event loop (bulk.py).
        body = await request.body()
        return await run_in_threadpool(create, run_id, body, _origin(config, request))

    def append(asset_id: str, body: bytes) -> Response:
        spec = parse_components_append(body, config.max_components_per_asset)
        return JSONResponse(catalog.append_components(asset_id, spec))

    @router.post(
        "/assets/{asset_id}/components",
        response_model=m.AssetSummary,
        tags=["assets"],
        openapi_extra={"requestBody": _json_body(m.ComponentsAppend)},
    )
    async def append_components(asset_id: str, request: Request) -> Response:
        # More of a manifest a create declared (``manifest``) and sent the first slice of;
        # parsed and stored on a worker thread, as a create is.
        body = await request.body()
        return await run_in_threadpool(append, asset_id, body)

    @router.get("/runs/{run_id}/assets", response_model=m.AssetList, tags=["assets"])
    def list_assets(
        run_id: str, include_pending: bool = False, asset_type: str | None = None
    ) -> Response:
        return JSONResponse({"assets": catalog.list_assets(run_id, include_pending, asset_type)})

    @router.get("/assets/{asset_id}", response_model=m.Asset, tags=["assets"])
    def get_asset(asset_id: str, components: bool = True) -> Response:
        if not components:  # the summary alone: what a rank waiting for the others polls
            return JSONResponse(catalog.records.summary(asset_id, retired=True))
        return JSONResponse(catalog.get_asset(asset_id))

    @router.post("/assets/{asset_id}/presign", response_model=m.TargetList, tags=["assets"])
    def presign(asset_id: str, body: m.PresignRequest, request: Request) -> Response:
        if len(body.targets) > config.max_presign_batch:
            raise too_large(
                f"{len(body.targets)} targets asked for; at most {config.max_presign_batch} per presign call"
            )
        wanted = [(t.path, t.part, t.checksum) for t in body.targets]
        return JSONResponse(
            {"targets": catalog.presign(asset_id, wanted, _origin(config, request))}
        )

    @router.post(
        "/assets/{asset_id}/finalize",
        response_model=m.Asset,
        tags=["assets"],
        responses={409: {"description": "asset_incomplete (with `missing`) or conflict"}},
    )
    def finalize(asset_id: str, body: m.FinalizeRequest | None = None) -> Response:
        body = body or m.FinalizeRequest()
        return JSONResponse(finalizer.finalize(asset_id, body.checksums, body.rank, body.brief))

    @router.delete("/assets/{asset_id}", status_code=204, response_class=Response, tags=["assets"])
    def delete_asset(asset_id: str) -> Response:
        catalog.delete_asset(asset_id)
        return Response(status_code=204)

    @router.get("/assets/{asset_id}/download", response_model=m.Download, tags=["assets"])
    def download(asset_id: str, request: Request) -> Response:
        return JSONResponse(catalog.download(asset_id, _origin(config, request)))


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses its body itself (see ``_add_schemas``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _add_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put ``models`` (bodies that routes parse themselves) into the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    config: ServerConfig, *, state: ServerState | None = None, blob_port: int | None = None
) -> FastAPI:
    """The whole server as an ASGI app. Without ``state`` the data dir is opened here.

    The opened state is ``app.state.chronicle`` (a ServerState); whoever runs the app closes
    it (``app.state.chronicle.close()``) after the server stops.
    """
    state = state or open_state(config)
    app = FastAPI(
        title="Chronicle (methodic embedded server)",
        version=__version__,
        description="The wire contract is docs/http-api.md of methodic.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.chronicle = state
    _install_error_handlers(app)
    app.add_middleware(_ControlGate, keyring=state.keyring, max_bytes=config.max_json_body)

    @app.get("/healthz", response_model=m.Health, tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(_api_router(state))
    _add_schemas(app, m.AssetCreate)
    app.state.blob_port = blob_port  # the blob listener's (blobs/listener.py), once it is bound
    app.router.routes.append(misdirected_route(blob_port))
    return app
