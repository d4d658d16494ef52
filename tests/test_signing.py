"""The presigned URL's signed message: built by hand, it must stay byte-identical to the JSON
array it always was (URLs issued before keep verifying, and no two grants sign alike)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from methodic.server.signing import CHECKSUM_HEADER, Grant, Signer, signed_message


def as_json(grant: Grant) -> bytes:
    fields: list[Any] = [
        "methodic-blob-v1",
        grant.method,
        grant.asset_id,
        grant.path,
        grant.part,
        grant.offset,
        grant.length,
        grant.expires,
    ]
    if grant.server is not None:
        fields.append(grant.server)
    if grant.checksum is not None:
        fields.append([CHECKSUM_HEADER, grant.checksum])
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


PATHS = [
    "model/shard-000001.bin",
    'we"ird\\path/\u00e9t\u00e9/\U0001f600.pt',
    "ctl\x00\x01\x1f\x7f\n\t\r/\u2028",
    "",
    '"],["x',
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("method", "part", "offset", "length", "server", "checksum"),
    [
        ("PUT", None, 0, 65536, "0123456789abcdef", "crc64nvme:0011223344556677"),
        ("PUT", 3, 2 * 1024**3, 1 << 20, None, None),
        ("PUT", 0, 0, 0, "f" * 64, 'sha256:"odd\u00ff'),
        ("GET", None, None, None, "0123456789abcdef", None),
    ],
)
def test_the_signed_message_is_the_json_array(
    path: str,
    method: str,
    part: int | None,
    offset: int | None,
    length: int | None,
    server: str | None,
    checksum: str | None,
) -> None:
    grant = Grant(
        method, "asset-\u00e9", path, part, offset, length, 1_900_000_000, server, checksum
    )
    assert signed_message(grant) == as_json(grant)
    secret = b"k" * 32
    mac = hmac.new(secret, as_json(grant), hashlib.sha256).hexdigest()
    assert Signer(secret).verify(grant, mac)
