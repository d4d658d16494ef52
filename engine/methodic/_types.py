"""Plain data types of the public API."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methodic._owner import owner_alive
from methodic._states import ComponentState


@dataclass(frozen=True)
class ComponentSpec:
    """One file of an asset: ``path`` inside the asset (relative, POSIX), where it is on disk, its size.

    ``sha256`` (hex) or ``checksum`` (``"algo:hex"``, algo one of crc64nvme, sha256, blake3) is
    the file's digest when the caller knows it: the engine checks the file against it before a
    byte is sent. ``mtime_ns``, ``inode``, ``ctime_ns`` and ``device`` are what the file looked
    like at registration; the tracker stats the file when they are not given, so a file that
    changes (even at the same size with its mtime put back) before it is sent is caught.
    """

    path: str
    local_path: Path | str
    size: int
    sha256: str | None = None
    checksum: str | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    ctime_ns: int | None = None
    device: int | None = None

    @classmethod
    def from_file(
        cls,
        path: str,
        local_path: Path | str,
        sha256: str | None = None,
        checksum: str | None = None,
    ) -> ComponentSpec:
        return cls.from_stat(path, local_path, os.stat(local_path), sha256, checksum)

    @classmethod
    def from_stat(
        cls,
        path: str,
        local_path: Path | str,
        st: os.stat_result,
        sha256: str | None = None,
        checksum: str | None = None,
    ) -> ComponentSpec:
        # Positional: a scan makes one per file, and keywords cost a quarter of each.
        return cls(
            path,
            local_path,
            st.st_size,
            sha256,
            checksum,
            st.st_mtime_ns,
            st.st_ino,
            st.st_ctime_ns,
            st.st_dev,
        )

    @property
    def declared(self) -> str | None:
        """The caller's digest of the file as ``algo:hex`` (``sha256=`` is ``sha256:...``)."""
        if self.checksum is not None:
            return self.checksum
        return f"sha256:{self.sha256.lower()}" if self.sha256 is not None else None


@dataclass(frozen=True)
class RunBinding:
    """Which server run a tracked asset belongs to, so a later process can finish it."""

    server_url: str
    run_id: str
    experiment_id: str
    variation: int
    run: int


@dataclass(frozen=True)
class TrackedComponent:
    """A component as the local tracker records it."""

    asset_id: str
    path: str
    local_path: str
    size: int
    sha256: str | None
    mtime_ns: int | None
    inode: int | None
    part_size: int | None
    state: str
    bytes_sent: int
    attempts: int
    last_error: str | None
    checksum: str | None
    parts_done: frozenset[int] = frozenset()
    ctime_ns: int | None = None
    device: int | None = None
    declared: str | None = None  # the caller's ``algo:hex`` of the whole file, if given
    # Digests (hex, the asset's algorithm) of the parts recorded as sent.
    part_digests: dict[int, str] = field(default_factory=dict, compare=False)


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    raise AssertionError("unreachable")


# The key under which the tracker keeps, in an asset's metadata, what a resumed process needs
# beyond the caller's metadata (a rank's contribution, delete_local); never sent to the server.
TRACKER_KEY = "_methodic"


@dataclass(frozen=True)
class TrackedAsset:
    """An asset as the local tracker records it (``components`` is empty in summaries)."""

    asset_id: str
    asset_type: str
    state: str
    sealed: bool
    metadata: dict[str, Any]
    binding: RunBinding | None
    local_dir: str | None
    created_at: float
    updated_at: float
    last_error: str | None
    owner_pid: int | None
    component_count: int
    completed_count: int
    total_bytes: int
    bytes_sent: int
    components: tuple[TrackedComponent, ...] = ()
    owner_start: int | None = None  # the owner's start time (clock ticks since boot), if known

    @property
    def contribution(self) -> tuple[str, int, int] | None:
        """(asset name, rank, world size) of a rank's contribution to a multi-rank asset."""
        extra = self.metadata.get(TRACKER_KEY)
        c = extra.get("contribution") if isinstance(extra, dict) else None
        return (c["asset_name"], c["rank"], c["world_size"]) if c else None

    @property
    def missing(self) -> list[TrackedComponent]:
        """The components not completed yet."""
        return [c for c in self.components if c.state != ComponentState.COMPLETED]

    def unsealed_note(self, *, stored: bool = False, cli: bool = False) -> str:
        """For an asset registered with ``seal=False`` and never sealed: what it holds (whether
        it is ``stored`` on the server) and what an operator does with it (in the Python API
        and the commands, or with ``cli`` the commands only)."""
        who = f"pid {self.owner_pid}" if self.owner_pid else "the registering process"
        held = f"{self.component_count} registered components ({_size(self.total_bytes)})"
        done = "stored on the server, not finalized" if stored else "not finalized"
        seal, discard = (
            f"methodic-tui seal {self.asset_id}",
            f"methodic-tui discard {self.asset_id}",
        )
        if cli:
            return (
                f"unsealed: {held}, {done}; {who} stopped before sealing it: "
                f"`{seal}` if nothing else belongs in it, or `{discard}`"
            )
        return (
            f"unsealed: {held}, {done}; {who} stopped before seal(). If nothing else belongs "
            f"in it, `tracker.seal({self.asset_id!r})` (`{seal}`) and drain again; otherwise "
            f"discard it: `tracker.discard(...)` or `chronicle.discard(...)` (`{discard}`)"
        )

    @property
    def owner_alive(self) -> bool:
        """Whether the process that owns this upload is another one that still runs here."""
        return owner_alive(self.owner_pid, self.owner_start)


@dataclass(frozen=True, slots=True)
class RemoteComponent:
    path: str
    size: int
    sha256: str | None
    part_size: int | None = None
    stored: bool = False
    parts_stored: tuple[int, ...] = ()
    checksum: str | None = None  # settled "algo:value" once finalized

    @classmethod
    def from_json(cls, c: dict[str, Any]) -> RemoteComponent:
        return cls(
            path=c["path"],
            size=c["size"],
            sha256=c.get("sha256"),
            part_size=c.get("part_size"),
            stored=bool(c.get("stored", False)),
            parts_stored=tuple(c.get("parts_stored") or ()),
            checksum=c.get("checksum"),
        )


def components_fingerprint(components: Iterable[RemoteComponent]) -> str:
    """What a brief answer says of the components it leaves out (docs/http-api.md): the sha256
    of one JSON array per component, ``[path, size, sha256, checksum, part_size, stored,
    parts_stored]`` (``separators=(",", ":")``), each followed by a newline, in manifest order."""
    h = hashlib.sha256()
    for c in components:
        fields = [c.path, c.size, c.sha256, c.checksum, c.part_size, c.stored, c.parts_stored]
        h.update(json.dumps(fields, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class RankContribution:
    """One rank's contribution to a multi-rank asset, as the server reports it."""

    rank: int
    state: str  # "registered" (not all stored yet) or "stored" (verified)
    component_count: int
    total_size: int
    seen_at: float  # the rank's last create or finalize
    stored_at: float | None = None


@dataclass(frozen=True)
class Asset:
    """An asset as the Chronicle server reports it."""

    asset_id: str
    run_id: str
    asset_type: str
    state: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float | None = None
    finalized_at: float | None = None
    component_count: int = 0
    total_size: int = 0
    components: tuple[RemoteComponent, ...] = ()
    checksum_algorithm: str | None = None  # of every range digest and file checksum
    # False while a manifest sent in slices has components still to be listed (pending only).
    manifest_complete: bool = True
    manifest_digest: str | None = field(default=None, compare=False, repr=False)
    # Of a multi-rank asset (docs/distributed.md): its name, world size, each rank's
    # contribution so far, the ranks not yet stored, and "waiting for ranks 5, 7 (...)".
    asset_name: str | None = None
    world_size: int | None = None
    contributions: tuple[RankContribution, ...] = ()
    ranks_missing: tuple[int, ...] = ()
    waiting: str | None = None
    # Of a brief answer (no components): what stands for them (``components_fingerprint``).
    components_fingerprint: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Asset:
        comps = tuple(RemoteComponent.from_json(c) for c in data.get("components") or ())
        return cls(
            asset_id=data["asset_id"],
            run_id=data["run_id"],
            asset_type=data["asset_type"],
            state=data["state"],
            metadata=data.get("metadata") or {},
            created_at=data.get("created_at"),
            finalized_at=data.get("finalized_at"),
            component_count=data.get("component_count", len(comps)),
            total_size=data.get("total_size", 0),
            components=comps,
            checksum_algorithm=data.get("checksum_algorithm"),
            manifest_complete=data.get("manifest_complete", True),
            manifest_digest=data.get("manifest_digest"),
            asset_name=data.get("asset_name"),
            world_size=data.get("world_size"),
            contributions=tuple(
                RankContribution(
                    rank=c["rank"],
                    state=c["state"],
                    component_count=c["component_count"],
                    total_size=c["total_size"],
                    seen_at=c["seen_at"],
                    stored_at=c.get("stored_at"),
                )
                for c in data.get("contributions") or ()
            ),
            ranks_missing=tuple(data.get("ranks_missing") or ()),
            waiting=data.get("waiting"),
            components_fingerprint=data.get("components_fingerprint"),
        )


@dataclass(frozen=True)
class UploadTarget:
    """Where to PUT one component (or one part of it)."""

    path: str
    part: int | None
    method: str
    url: str
    headers: dict[str, str]
    offset: int
    length: int
    expires_at: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UploadTarget:
        return cls(
            path=data["path"],
            part=data.get("part"),
            method=data.get("method", "PUT"),
            url=data["url"],
            headers=dict(data.get("headers") or {}),
            offset=int(data.get("offset", 0)),
            length=int(data["length"]),
            expires_at=float(data["expires_at"]),
        )


@dataclass(frozen=True)
class PresignedAsset:
    """What ``create_asset_presigned`` returns: the pending asset and its upload targets."""

    asset_id: str
    asset: Asset
    targets: tuple[UploadTarget, ...]
