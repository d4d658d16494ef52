"""Big manifests without a stalled server: parse, validate and render them in slices.

A create with 200,000 components is seconds of CPU. Run on the event loop (as FastAPI parses
bodies) it stalls every other client for all that time; and one C call over the whole list
(pydantic's validation, ``json.dumps``) holds the GIL from start to end, which stalls the blob
listener's thread too. So the create route reads its raw body and calls ``parse_asset_create``
and ``render_json`` on a worker thread, and they work through ``SLICE`` items at a time: other
threads get the GIL between slices.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from methodic.server.errors import APIError, too_large
from methodic.server.models import AssetCreate, ComponentIn, ComponentsAppend

Parsed = TypeVar("Parsed", AssetCreate, ComponentsAppend)

SLICE = 2000
# Bodies this big are parsed by at most BIG_AT_ONCE requests at a time (memory stays bounded).
BIG_BODY = 1024 * 1024
BIG_AT_ONCE = 2
_big = threading.BoundedSemaphore(BIG_AT_ONCE)
_components = TypeAdapter(list[ComponentIn])
_dumps = partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _errors(exc: ValidationError, prefix: tuple[Any, ...], offset: int = 0) -> list[dict[str, Any]]:
    out = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        if offset and loc and isinstance(loc[0], int):
            loc = (loc[0] + offset, *loc[1:])
        out.append({**error, "loc": (*prefix, *loc)})
    return out


def parse_asset_create(body: bytes, max_components: int) -> AssetCreate:
    """The create-asset request in ``body``; raises RequestValidationError (422) as FastAPI
    would, or APIError 413 when it has over ``max_components`` (before validating them)."""
    return _bounded(body, max_components, AssetCreate)


def parse_components_append(body: bytes, max_components: int) -> ComponentsAppend:
    """The append-components request in ``body``, as ``parse_asset_create`` parses a create."""
    return _bounded(body, max_components, ComponentsAppend)


def _bounded(body: bytes, max_components: int, model: type[Parsed]) -> Parsed:
    if len(body) < BIG_BODY:
        return _parse(body, max_components, model)
    with _big:
        return _parse(body, max_components, model)


def _parse(body: bytes, max_components: int, model: type[Parsed]) -> Parsed:
    if not body:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "Field required", "type": "missing"}]
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        raise RequestValidationError(
            [{"loc": ("body", position), "msg": "JSON decode error", "type": "json_invalid"}]
        ) from None
    if not isinstance(data, dict):
        raise RequestValidationError(
            [
                {
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "type": "model_attributes_type",
                }
            ]
        )
    components = data.get("components")
    sliced = isinstance(components, list)
    if isinstance(components, list) and len(components) > max_components:
        raise too_many_components(len(components), max_components)
    try:
        spec = model.model_validate({**data, "components": []} if sliced else data)
    except ValidationError as exc:
        raise RequestValidationError(_errors(exc, ("body",))) from None
    if sliced:
        assert isinstance(components, list)
        validated: list[ComponentIn] = []
        for start in range(0, len(components), SLICE):
            try:
                validated += _components.validate_python(components[start : start + SLICE])
            except ValidationError as exc:
                raise RequestValidationError(_errors(exc, ("body", "components"), start)) from None
        spec.components = validated
    return spec


def render_json(value: Any) -> bytes:
    """``value`` as compact JSON (as starlette's JSONResponse renders it), long lists in slices."""
    return "".join(_render(value)).encode("utf-8")


def _render(value: Any) -> Iterator[str]:
    if isinstance(value, list) and len(value) > SLICE:
        yield "["
        for start in range(0, len(value), SLICE):
            if start:
                yield ","
            yield _dumps(value[start : start + SLICE])[1:-1]
        yield "]"
    elif isinstance(value, dict) and any(
        isinstance(v, list) and len(v) > SLICE for v in value.values()
    ):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield f"{',' if i else ''}{_dumps(str(key))}:"
            yield from _render(item)
        yield "}"
    else:
        yield _dumps(value)


def too_many_components(count: int, limit: int) -> APIError:
    return too_large(
        f"the manifest has {count} components; this server accepts at most {limit} per asset"
    )
