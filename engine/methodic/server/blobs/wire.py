"""HTTP/1.1 on the blob listener's wire: request heads (parsed by httptools), responses, ranges.

The listener frames requests itself (a head ends at its first blank line; a body is exactly
``Content-Length`` bytes) so that body bytes never pass through the parser: httptools sees
the head only, and validates it. Chunked bodies are not accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools

HEAD_END = b"\r\n\r\n"


class BadRequest(Exception):
    """The head is not HTTP/1.x that this listener accepts; answered 400 and the connection closed."""


@dataclass
class RequestHead:
    method: str
    target: bytes
    version: str
    keep_alive: bool
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names
    path: str = ""
    query: dict[str, str] = field(default_factory=dict)

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def expects_continue(self) -> bool:
        return (
            self.version == "1.1"
            and self.headers.get(b"expect", b"").strip().lower() == b"100-continue"
        )

    def content_length(self) -> int | None:
        """The declared body length; None when absent. Raises BadRequest for a chunked body."""
        if b"transfer-encoding" in self.headers:
            raise BadRequest("chunked request bodies are not accepted")
        value = self.headers.get(b"content-length")
        if value is None:
            return None
        value = value.strip()
        if not value.isdigit() or len(value) > 19:
            raise BadRequest(f"invalid Content-Length {value[:40]!r}")
        return int(value)


class HeadParser:
    """Collects one request head from httptools' callbacks (a new parser per request)."""

    def __init__(self) -> None:
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self.complete = False
        self._parser = httptools.HttpRequestParser(self)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self._headers:
            if name == b"content-length" and self._headers[name] != value:
                raise BadRequest("conflicting Content-Length headers")
            if name != b"content-length":
                self._headers[name] += b", " + value
            return
        self._headers[name] = value

    def on_headers_complete(self) -> None:
        self.complete = True

    def feed(self, data: memoryview) -> None:
        if not data:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.complete = True  # no upgrade is offered; the request is answered as it is
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            raise cause if isinstance(cause, BadRequest) else BadRequest(str(exc)) from exc
        except httptools.HttpParserError as exc:
            raise BadRequest(f"malformed request: {exc}") from exc

    def head(self) -> RequestHead:
        parser = self._parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError as exc:
            raise BadRequest("malformed request target") from exc
        try:
            raw_path = url.path.decode("ascii")
            query = url.query.decode("ascii") if url.query else ""
        except UnicodeDecodeError as exc:
            raise BadRequest("the request target is not ASCII (percent-encode it)") from exc
        return RequestHead(
            method=parser.get_method().decode("ascii", "replace"),
            target=self._url,
            version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
            headers=self._headers,
            path=unquote(raw_path) if "%" in raw_path else raw_path,
            query=_query(query),
        )


def _query(query: str) -> dict[str, str]:
    """``parse_qsl`` (blank values kept), by plain splits when nothing is to be decoded (a
    presigned URL's query): the same pairs, at a fraction of the cost per request."""
    if "%" in query or "+" in query:
        return dict(parse_qsl(query, keep_blank_values=True))
    return dict(pair.partition("=")[::2] for pair in query.split("&") if pair)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def response_head(
    status: int, headers: dict[str, str], *, length: int, close: bool = False
) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# Serialized exactly as Starlette's JSONResponse does, so both listeners answer alike (one
# encoder kept: json.dumps with these options would build one per call).
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def json_body(content: Any) -> bytes:
    return _JSON.encode(content).encode("utf-8")


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json_body({"error": {"code": code, "message": message, **extra}})


class RangeNotSatisfiable(Exception):
    pass


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(offset, count)`` of a single-range ``Range`` header; None: send the whole body.

    Multiple ranges, other units and syntax errors are ignored (RFC 9110 lets a server send
    the whole representation instead). Raises RangeNotSatisfiable when no byte of the range
    exists.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), min(suffix, size)
    start = int(first)
    end = max(start, size - 1) if last == "" else int(last)
    if end < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1) - start + 1
