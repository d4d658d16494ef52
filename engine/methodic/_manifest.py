"""The manifest's digest, one definition for the client and the server.

A create names its manifest by this digest: the same id with the same manifest is the same
asset (create is idempotent), with another it is refused. A client that sends its manifest in
slices declares the digest of the whole up front; the server checks it once the last slice
is in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

_DIGEST_SLICE = 2000


def manifest_digest(run_id: str, asset_type: str, components: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 of the canonical JSON of the manifest (hashed in slices: one ``json.dumps`` of
    a 200,000-item list would hold the GIL for its whole length)."""
    head = json.dumps(
        {"run_id": run_id, "asset_type": asset_type}, separators=(",", ":"), ensure_ascii=True
    )
    digest = hashlib.sha256(f'{head[:-1]},"components":['.encode("ascii"))
    rows = sorted(
        (c["path"], c["size"], c.get("sha256") and c["sha256"].lower(), c.get("part_size"))
        for c in components
    )
    for start in range(0, len(rows), _DIGEST_SLICE):
        text = json.dumps(rows[start : start + _DIGEST_SLICE], separators=(",", ":"))
        digest.update(("," if start else "").encode("ascii") + text[1:-1].encode("ascii"))
    digest.update(b"]}")
    return digest.hexdigest()
