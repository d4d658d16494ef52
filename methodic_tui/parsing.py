"""Parsers for option values (no argparse, no UI): rates in bytes or bits, sizes, durations, URLs."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from methodic import ChronicleError, parse_rate

MAX_WORKERS = 256
_BITS = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:bit|bits|bps|bit/s|b/s)\s*$"  # lowercase b: bits
)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}


class ValueProblem(ValueError):
    """A value that cannot be used; the message says why, in one line."""


def rate(text: str) -> float | None:
    """Bytes/s from ``200MB``, ``1.5GiB``, or bits as AzCopy takes them (``200Mbit``, ``1Gbps``).

    0 (or ``none``) means no cap: None.
    """
    bits = _BITS.match(text)
    if bits:
        value = float(bits.group(1)) * _SCALE[bits.group(2).lower()] / 8
        return value or None
    try:
        return parse_rate(text)
    except ChronicleError:
        raise ValueProblem(
            f"{text!r} is not a rate: bytes/s like 200MB or 1.5GiB, bits/s like 200Mbit "
            "or 1Gbps, or 0 for no cap"
        ) from None


def size(text: str) -> int:
    """A positive number of bytes: ``300MB``, ``1GiB``, ``5000``."""
    try:
        value = parse_rate(text)
    except ChronicleError:
        raise ValueProblem(f"{text!r} is not a size, e.g. 300MB or 1GiB") from None
    if not value or value < 1:
        raise ValueProblem(f"{text!r} is not a size above 0, e.g. 300MB")
    return int(value)


def duration(text: str) -> float:
    """Seconds from ``30``, ``30s``, ``500ms``, ``5m``, ``1h``; 0 is allowed."""
    m = _DURATION.match(text)
    if not m:
        raise ValueProblem(f"{text!r} is not a duration, e.g. 30s, 5m or 0")
    return float(m.group(1)) * _DURATION_SCALE[m.group(2)]


def workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueProblem(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueProblem(f"{value} is not >= 1")
    if value > MAX_WORKERS:
        raise ValueProblem(f"{value} transfers at once is more than the {MAX_WORKERS} allowed")
    return value


def server_url(text: str) -> str:
    """An http(s) URL with a host and a valid port, or a one-line reason it is not."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueProblem(f"--server-url {text!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueProblem(
            f"--server-url {text!r} is not an http:// or https:// URL with a host, "
            "e.g. http://chronicle.example:8765"
        )
    if port == 0:
        raise ValueProblem(f"--server-url {text!r}: port 0 is not a port")
    return text
