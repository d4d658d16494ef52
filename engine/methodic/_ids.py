"""Client-chosen, time-ordered asset ids (UUIDv7, RFC 9562)."""

from __future__ import annotations

import os
import time
import uuid


def new_asset_id() -> str:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | (rand >> 68 & 0xFFF) << 64
        | 0b10 << 62
        | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


# The namespace of the ids of multi-rank assets (docs/distributed.md): a fixed UUIDv4.
_CONTRIBUTION_NAMESPACE = uuid.UUID("6f1c3a52-9d47-4e0b-8a1e-2b7c5d93f0a4")


def contribution_id(run_id: str, asset_name: str) -> str:
    """The id every rank derives, without talking to the others, for asset ``asset_name`` of a
    run (a UUIDv5 of both; the server checks it)."""
    return str(uuid.uuid5(_CONTRIBUTION_NAMESPACE, f"{run_id}/{asset_name}"))
