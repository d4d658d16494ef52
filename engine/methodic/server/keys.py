"""API keys (``sk_agent_...``) and the presigning secret of a data directory.

Keys are kept only as SHA-256 hashes in the metadata database; the one copy of a generated
key is DATA_DIR/api_key (mode 0600), written once. A server accepts exactly one key per
start: the ``--api-key`` it was given, or else the key in DATA_DIR/api_key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from methodic.server.db import Database

KEY_PREFIX = "sk_agent_"
API_KEY_FILE = "api_key"
SECRET_FILE = "secret"
MAX_KEY_LENGTH = 512


class KeyFileError(RuntimeError):
    """DATA_DIR/api_key or DATA_DIR/secret cannot be used."""


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be used as an API key (it must fit in an HTTP header), or None."""
    if not key:
        return "is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"is longer than {MAX_KEY_LENGTH} characters"
    if not all("!" <= ch <= "~" for ch in key):
        return "must be printable ASCII without spaces"
    return None


@dataclass(frozen=True)
class ActiveKey:
    """The key this server start accepts. ``key`` never appears in ``repr``."""

    key: str = field(repr=False)
    origin: Literal["given", "generated"]
    key_file: Path | None  # where the generated key lives; None for a given key
    generated_now: bool


class KeyRing:
    """Verifies presented keys against the accepted hashes in constant time."""

    def __init__(self, hashes: list[str]) -> None:
        self._hashes = [bytes.fromhex(h) for h in hashes]

    def __repr__(self) -> str:
        return f"KeyRing({len(self._hashes)} key(s))"

    def verify(self, presented: str | None) -> bool:
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for expected in self._hashes:
            ok |= hmac.compare_digest(digest, expected)
        return ok


def _create_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` (0600) holding ``data`` unless it exists; never leaves it half written."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic create-if-absent, already complete
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def _read_key_file(path: Path) -> str:
    key = path.read_text(encoding="utf-8", errors="replace").strip()
    problem = api_key_problem(key)
    if problem is not None:
        raise KeyFileError(
            f"{path} is damaged (the key {problem}); delete it to have a new key generated"
        )
    return key


def activate_api_key(db: Database, data_dir: Path, given: str | None) -> tuple[ActiveKey, KeyRing]:
    """Decide which key this start accepts, record its hash, and return it with a verifier."""
    if given is not None:
        problem = api_key_problem(given)
        if problem is not None:
            raise ValueError(f"the API key {problem}")
        active = ActiveKey(key=given, origin="given", key_file=None, generated_now=False)
    else:
        key_file = data_dir / API_KEY_FILE
        generated_now = False
        if not key_file.exists():
            generated_now = _create_private_file(key_file, (generate_api_key() + "\n").encode())
        active = ActiveKey(
            key=_read_key_file(key_file),
            origin="generated",
            key_file=key_file,
            generated_now=generated_now,
        )
    key_hash = hash_api_key(active.key)
    with db.write(durable=True) as tx:
        # One accepted key per start: a rotated or replaced key stops working.
        tx.execute("DELETE FROM api_keys WHERE key_hash != ?", (key_hash,))
        tx.execute(
            "INSERT OR IGNORE INTO api_keys (key_hash, origin, created_at) VALUES (?, ?, ?)",
            (key_hash, active.origin, time.time()),
        )
        hashes = [row[0] for row in tx.execute("SELECT key_hash FROM api_keys")]
    return active, KeyRing(hashes)


def load_or_create_secret(data_dir: Path) -> bytes:
    """The HMAC secret for presigned URLs, created once per data directory."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _create_private_file(path, secrets.token_hex(32).encode() + b"\n")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 32:
        raise KeyFileError(
            f"{path} is damaged; delete it (outstanding presigned URLs stop working)"
        )
    return secret
