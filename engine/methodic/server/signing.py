"""HMAC-SHA256 presigned blob URLs.

A URL grants one method on one byte range of one component until it expires:
``/blobs/{asset_id}/{quoted path}?part=N&off=O&len=L&sid=I&exp=E&sig=S`` (GET URLs carry only
``sid``, ``exp`` and ``sig``). The signature covers every one of those fields, JSON-encoded so
that no choice of path can make two different grants sign the same message.

A PUT grant may be *bound* to the digest of its body: the grant's ``checksum`` (``algo:hex``)
travels as the request header ``x-methodic-checksum`` (not in the URL), and the signature
covers it, so a request without that header, or with another value, fails the signature; the
receiver then refuses a body whose digest differs.

``sid`` names the server that issued the URL (``Signer.server_id``, stable per data dir): a
blob listener answers a URL of another server 421, and names itself in every answer, so a
client can tell that what listens at a URL's address is not the server that issued it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from urllib.parse import quote, urlencode

_DOMAIN = "methodic-blob-v1"
_json_string: Callable[[str], str] = encode_basestring_ascii  # ASCII JSON, as json.dumps
_SERVER_ID = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True)
class Grant:
    method: str  # "PUT" or "GET"
    asset_id: str
    path: str
    part: int | None  # None: the whole component
    offset: int | None  # None (with length) for GET
    length: int | None
    expires: int  # Unix seconds
    server: str | None = None  # the issuing server's id (None: a URL from before ids)
    checksum: str | None = None  # "algo:hex" the PUT body must have (CHECKSUM_HEADER)


CHECKSUM_HEADER = "x-methodic-checksum"


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        # Derived from the data dir's secret: the same across restarts, another for another dir.
        self.server_id = hmac.new(secret, b"methodic-server-id-v1", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return "Signer(<secret>)"

    def grant(
        self,
        method: str,
        asset_id: str,
        path: str,
        part: int | None,
        offset: int | None,
        length: int | None,
        expires: int,
        checksum: str | None = None,
    ) -> Grant:
        """A Grant issued by this server (its ``server`` is ``server_id``)."""
        return Grant(
            method, asset_id, path, part, offset, length, expires, self.server_id, checksum
        )

    def _mac(self, grant: Grant) -> str:
        return hmac.digest(self._secret, signed_message(grant), "sha256").hex()

    def url(self, origin: str, grant: Grant) -> str:
        params: dict[str, int | str] = {}
        if grant.part is not None:
            params["part"] = grant.part
        if grant.offset is not None and grant.length is not None:
            params["off"] = grant.offset
            params["len"] = grant.length
        if grant.server is not None:
            params["sid"] = grant.server
        params["exp"] = grant.expires
        params["sig"] = self._mac(grant)
        return f"{origin}/blobs/{grant.asset_id}/{quote(grant.path, safe='/')}?{urlencode(params)}"

    def verify(self, grant: Grant, signature: str) -> bool:
        return hmac.compare_digest(self._mac(grant), signature)


def _number(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def signed_message(grant: Grant) -> bytes:
    """What the signature covers: the grant's fields as a JSON array (ASCII, no spaces), put
    together by hand: the bytes of ``json.dumps(fields, separators=(",", ":"))`` (ensure_ascii),
    at a fraction of its cost per request (tests/test_signing.py holds them equal)."""
    q = _json_string
    message = (
        f'["{_DOMAIN}",{q(grant.method)},{q(grant.asset_id)},{q(grant.path)},'
        f"{_number(grant.part)},{_number(grant.offset)},{_number(grant.length)},"
        f"{_number(grant.expires)}"
    )
    if grant.server is not None:
        message += f",{q(grant.server)}"
    if grant.checksum is not None:
        message += f',["{CHECKSUM_HEADER}",{q(grant.checksum)}]'
    return f"{message}]".encode("ascii")


def expiry(ttl: float, now: float | None = None) -> int:
    return math.ceil((time.time() if now is None else now) + ttl)


def _uint(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise ValueError(value)
    return int(value)


def grant_from_query(
    method: str,
    asset_id: str,
    path: str,
    query: Mapping[str, str],
    checksum: str | None = None,
) -> tuple[Grant, str] | None:
    """The grant a request claims and its signature, or None when the query is malformed.

    ``checksum``: the request's ``x-methodic-checksum`` header, if it has one.
    """
    try:
        grant = Grant(
            method=method,
            asset_id=asset_id,
            path=path,
            part=_uint(query.get("part")),
            offset=_uint(query.get("off")),
            length=_uint(query.get("len")),
            expires=_uint(query["exp"]) or 0,
            server=query.get("sid"),
            checksum=checksum,
        )
    except (KeyError, ValueError):
        return None
    if grant.server is not None and not _SERVER_ID.fullmatch(grant.server):
        return None
    signature = query.get("sig", "")
    if (grant.offset is None) != (grant.length is None):
        return None
    return grant, signature
