"""HMAC-SHA256 presigned blob URLs.

A URL grants one method on one byte range of one component until it expires:
``/blobs/{asset_id}/{quoted path}?part=N&off=O&len=L&exp=E&sig=S`` (GET URLs carry only
``exp`` and ``sig``). The signature covers every one of those fields, JSON-encoded so that
no choice of path can make two different grants sign the same message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode

_DOMAIN = "methodic-blob-v1"


@dataclass(frozen=True)
class Grant:
    method: str  # "PUT" or "GET"
    asset_id: str
    path: str
    part: int | None  # None: the whole component
    offset: int | None  # None (with length) for GET
    length: int | None
    expires: int  # Unix seconds


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __repr__(self) -> str:
        return "Signer(<secret>)"

    def _mac(self, grant: Grant) -> str:
        message = json.dumps(
            [
                _DOMAIN,
                grant.method,
                grant.asset_id,
                grant.path,
                grant.part,
                grant.offset,
                grant.length,
                grant.expires,
            ],
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hmac.new(self._secret, message.encode("ascii"), hashlib.sha256).hexdigest()

    def url(self, origin: str, grant: Grant) -> str:
        params: dict[str, int | str] = {}
        if grant.part is not None:
            params["part"] = grant.part
        if grant.offset is not None and grant.length is not None:
            params["off"] = grant.offset
            params["len"] = grant.length
        params["exp"] = grant.expires
        params["sig"] = self._mac(grant)
        return f"{origin}/blobs/{grant.asset_id}/{quote(grant.path, safe='/')}?{urlencode(params)}"

    def verify(self, grant: Grant, signature: str) -> bool:
        return hmac.compare_digest(self._mac(grant), signature)


def expiry(ttl: float, now: float | None = None) -> int:
    return math.ceil((time.time() if now is None else now) + ttl)


def _uint(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise ValueError(value)
    return int(value)


def grant_from_query(
    method: str, asset_id: str, path: str, query: Mapping[str, str]
) -> tuple[Grant, str] | None:
    """The grant a request claims and its signature, or None when the query is malformed."""
    try:
        grant = Grant(
            method=method,
            asset_id=asset_id,
            path=path,
            part=_uint(query.get("part")),
            offset=_uint(query.get("off")),
            length=_uint(query.get("len")),
            expires=_uint(query["exp"]) or 0,
        )
    except (KeyError, ValueError):
        return None
    signature = query.get("sig", "")
    if (grant.offset is None) != (grant.length is None):
        return None
    return grant, signature
