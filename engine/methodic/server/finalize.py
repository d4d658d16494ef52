"""Finalize: verify that storage holds every component of an asset, then make it visible.

Under the asset's lock, every manifest component is checked in storage (size, and its whole-file
checksum where it can be known: on local storage derived from the receipts' range digests
without reading the file while this process's stamps hold), compared with the checksum the
client computed (``{"checksums": {path: "algo:value"}}``), storage seals what it must (fsync,
S3 multipart completion with the client's checksum, so S3 verifies it), and only then does
``pending -> finalized`` commit, in one transaction, with each component's settled checksum. What failed verification is forgotten
(its records, and for whole components its bytes) so that the client sends it again; a
repeated finalize returns the finalized asset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from methodic import _checksum
from methodic._types import RemoteComponent, components_fingerprint
from methodic.server import contributions
from methodic.server.errors import APIError, conflict, invalid, not_found
from methodic.server.records import AssetRecords
from methodic.server.storage.base import Component

SHOWN_IN_MESSAGE = 5


class Finalizer:
    def __init__(
        self, records: AssetRecords, retention: Callable[[str, str], object] | None = None
    ) -> None:
        self.records = records
        self.retention = retention  # called with (run id, asset type) after a finalize

    def finalize(
        self,
        asset_id: str,
        checksums: Mapping[str, str],
        rank: int | None = None,
        brief: bool = False,
    ) -> dict[str, Any]:
        """Verify and publish the asset; of a multi-rank asset, verify and store ``rank``'s
        contribution, publishing the asset with the last one. Then apply the retention.
        ``brief``: the answer's components are only their fingerprint."""
        asset = self._finalize(asset_id, checksums, rank)
        if asset["state"] == "finalized" and self.retention is not None:
            self.retention(asset["run_id"], asset["asset_type"])
        if brief:
            components = asset.pop("components")
            asset["components_fingerprint"] = components_fingerprint(
                RemoteComponent.from_json(c) for c in components
            )
            asset["components"] = []
        return asset

    def _finalize(
        self, asset_id: str, checksums: Mapping[str, str], rank: int | None
    ) -> dict[str, Any]:
        with self.records.locks.hold(asset_id):
            asset, components = self.records.load(asset_id)
            if not asset["manifest_complete"]:
                raise APIError(
                    409,
                    "manifest_incomplete",
                    f"asset {asset_id} lists {len(components)} of its "
                    f"{asset['component_count']} components: append the rest "
                    f"(POST /api/v1/assets/{asset_id}/components), then finalize",
                )
            world_size: int | None = asset["world_size"]
            contribution_stored = False
            if world_size is not None or rank is not None:
                components, contribution_stored = self._contribution(asset, components, rank)
            unknown = set(checksums) - {c.path for c in components}
            if unknown:
                shown = sorted(unknown)[:SHOWN_IN_MESSAGE]
                raise invalid(
                    f"checksums name paths that are not components of asset {asset_id}: {shown}"
                )
            algorithm: str | None = asset["checksum_algorithm"]
            wanted = _client_checksums(asset_id, algorithm, components, checksums)
            if asset["state"] == "finalized" or contribution_stored:
                self._check_refinalize(asset_id, components, wanted)
                return self.records.with_components(asset, components)
            self.records.touch(asset_id)
            verdict = self._verify(asset_id, components, wanted)
            if not verdict.missing:
                by_index = {c.index: wanted[c.path] for c in components if c.path in wanted}
                for c, why in self.records.storage.seal(
                    asset_id, components, self.records.config.finalize_workers, by_index
                ):
                    verdict.missing.append(_missing_item(c, why, c.parts))
                    verdict.forget_whole.append(c)
            if verdict.missing:
                self._forget(asset_id, verdict.forget_whole, verdict.forget_parts)
                raise _incomplete(asset_id, verdict.missing, len(components))
            settled_algorithm = algorithm or _checksum.SHA256
            with self.records.db.write(durable=True) as tx:
                rows = []
                for c in components:
                    value = verdict.settled.get(c.index)
                    checksum = f"{settled_algorithm}:{value}" if value else None
                    # A legacy asset's receipts column held the settled sha256: keep it so.
                    stored = value if algorithm is None and value else c.stored_digest
                    rows.append((checksum, stored, asset_id, c.index))
                tx.executemany(
                    "UPDATE components SET checksum = ?, stored_digest = ?"
                    " WHERE asset_id = ? AND idx = ?",
                    rows,
                )
                if tx.execute("SELECT 1 FROM assets WHERE id = ?", (asset_id,)).fetchone() is None:
                    raise not_found(f"asset {asset_id} was deleted while being finalized")
                if rank is None or contributions.mark_stored(tx, asset_id, rank, world_size or 1):
                    tx.execute(
                        "UPDATE assets SET state = 'finalized', finalized_at = ?"
                        " WHERE id = ? AND state = 'pending'",
                        (time.time(), asset_id),
                    )
            if rank is None:
                return self.records.get_asset(asset_id)
            asset, every = self.records.load(asset_id)
            mine = {c.index for c in components}
            return self.records.with_components(asset, [c for c in every if c.index in mine])

    def _contribution(
        self, asset: dict[str, Any], components: list[Component], rank: int | None
    ) -> tuple[list[Component], bool]:
        """The components of ``rank``'s contribution, and whether it is stored already."""
        asset_id, name = asset["asset_id"], asset["asset_name"]
        if asset["world_size"] is None:
            raise invalid(f"asset {asset_id} is not a multi-rank asset; finalize it without rank")
        if rank is None:
            raise invalid(
                f"asset {name!r} ({asset_id}) is a multi-rank asset of {asset['world_size']} "
                "ranks: each rank finalizes its own contribution (with its rank), and the "
                "server publishes the asset when every one is stored"
            )
        conn = self.records.db.connection()
        state = contributions.contribution_state(conn, asset_id, rank)
        if state is None:
            raise conflict(
                f"rank {rank} has not registered a contribution to asset {name!r} ({asset_id})"
            )
        mine = contributions.rank_indexes(conn, asset_id, rank)
        if state == "registered":
            with self.records.db.write() as tx:
                contributions.seen(tx, asset_id, rank)
        return [c for c in components if c.index in mine], state == "stored"

    def _check_refinalize(
        self, asset_id: str, components: list[Component], wanted: Mapping[str, str]
    ) -> None:
        for c in components:
            want = wanted.get(c.path)
            known = c.checksum.partition(":")[2] if c.checksum else None
            if c.algorithm is None:
                known = known or c.stored_digest or c.sha256
            if want is not None and known is not None and want != known:
                algorithm = c.receipt_algorithm
                raise conflict(
                    f"asset {asset_id} is already finalized and its {c.path!r} has checksum "
                    f"{algorithm}:{known}, not {algorithm}:{want}; upload different content "
                    "under a new asset id"
                )

    def _verify(
        self, asset_id: str, components: list[Component], wanted: Mapping[str, str]
    ) -> _Verdict:
        verdict = _Verdict()
        writers = self.records.locks.part_writers
        arriving = self.records.locks.parts_arriving
        for c in components:
            # Every part has its receipt: a body still arriving is a duplicate (a stale retry,
            # a leaked URL held open). It is cut off, so it can neither hold finalize back nor
            # write after it; what it wrote tears the file, which is then read back below.
            if c.received:
                for upload in list(writers.get((asset_id, c.index), ())):
                    upload.abort()
        found = self.records.storage.inspect(
            asset_id, components, deep=True, workers=self.records.config.finalize_workers
        )
        for c, f in zip(components, found, strict=True):
            busy = writers.get((asset_id, c.index)) or arriving.get((asset_id, c.path))
            if busy and not c.received:
                verdict.missing.append({"path": c.path, "reason": "upload in progress"})
                continue
            if not f.complete:
                missing = [n for n in range(1, c.parts + 1) if n not in f.parts]
                verdict.missing.append(_missing_item(c, "not stored", missing))
                if c.received:  # receipts say stored, the bytes are gone: forget the receipts
                    verdict.forget_whole.append(c)
                continue
            reason: str | None = None
            client = wanted.get(c.path)
            if f.size is not None and f.size != c.size:
                reason = f"size mismatch: stored {f.size} bytes, the manifest says {c.size}"
            elif f.bad_parts:
                bad = list(f.bad_parts)
                verdict.missing.append(
                    _missing_item(
                        c,
                        f"checksum mismatch: stored parts {bad} differ from what was uploaded",
                        bad,
                    )
                )
                verdict.forget_parts.append((c, bad))
                continue
            elif f.damaged:
                reason = f"checksum mismatch: {f.damaged}"
            elif client is None and c.bound is None:
                # Some receipts were bound, some not, and the client vouches for none.
                unbound = [n for n in c.parts_stored if n not in c.parts_bound]
                verdict.missing.append(
                    _missing_item(
                        c,
                        f"not verified: parts {unbound} were sent without a checksum; "
                        "send them again with one, or finalize with the file's checksum",
                        unbound,
                    )
                )
                verdict.forget_parts.append((c, unbound))
                continue
            else:
                reason = _checksum_problem(c, f.digest, client)
            if reason is None:
                verdict.settled[c.index] = client or f.digest or _legacy_sha256(c)
            else:
                verdict.missing.append(_missing_item(c, reason, c.parts if c.part_size else ()))
                verdict.forget_whole.append(c)
        return verdict

    def _forget(
        self, asset_id: str, whole: list[Component], parts: list[tuple[Component, list[int]]]
    ) -> None:
        """Drop the records (and for whole components the bytes) of what failed verification."""
        if not whole and not parts:
            return
        with self.records.db.write() as tx:
            for c in whole:
                tx.execute(
                    "UPDATE components SET stored_digest = NULL, stored_bound = 0"
                    " WHERE asset_id = ? AND idx = ?",
                    (asset_id, c.index),
                )
                tx.execute("DELETE FROM parts WHERE asset_id = ? AND idx = ?", (asset_id, c.index))
            for c, numbers in parts:
                tx.executemany(
                    "DELETE FROM parts WHERE asset_id = ? AND idx = ? AND part = ?",
                    ((asset_id, c.index, n) for n in numbers),
                )
        for c in whole:
            self.records.storage.forget(c.key(asset_id))


def _legacy_sha256(c: Component) -> str | None:
    """What a legacy asset settled on when nothing better was known: the manifest's sha256."""
    return c.sha256 if c.algorithm is None else None


def _client_checksums(
    asset_id: str,
    algorithm: str | None,
    components: Sequence[Component],
    checksums: Mapping[str, str],
) -> dict[str, str]:
    """{path: checksum value} of the finalize body, in the asset's algorithm. Raises 400.

    A legacy asset (no algorithm) takes sha256 ones, and a bare 64-hex value as sha256.
    """
    expected = algorithm or _checksum.SHA256
    by_path = {c.path: c for c in components}
    out: dict[str, str] = {}
    for path, text in checksums.items():
        if algorithm is None and _checksum.is_digest(_checksum.SHA256, text.lower()):
            out[path] = text.lower()
            continue
        try:
            got, value = _checksum.parse(text)
        except _checksum.ChecksumFormatError as exc:
            raise invalid(f"checksum of {path[:300]!r}: {exc}") from None
        if got != expected:
            raise invalid(
                f"checksum of {path[:300]!r} is {got}, but asset {asset_id} uses {expected} "
                "checksums (its checksum_algorithm)"
            )
        c = by_path[path]
        _digest, dash, count = value.partition("-")
        composite = algorithm is not None and c.part_size is not None and got != _checksum.CRC64NVME
        if composite and count != str(c.parts):
            raise invalid(
                f"checksum of {path[:300]!r}: a {got} file sent in {c.parts} parts has the "
                f"composite checksum '{got}:<hex>-{c.parts}' (the digest of its parts' digests)"
            )
        if not composite and dash:
            raise invalid(
                f"checksum of {path[:300]!r}: give the plain {got} value, without '-{count}'"
            )
        out[path] = value
    return out


@dataclass
class _Verdict:
    """What finalize's verification found: what is missing, what to forget, what was verified."""

    missing: list[dict[str, Any]] = field(default_factory=list)
    forget_whole: list[Component] = field(default_factory=list)
    forget_parts: list[tuple[Component, list[int]]] = field(default_factory=list)
    settled: dict[int, str | None] = field(default_factory=dict)  # whole-file checksum values


def _missing_item(c: Component, reason: str, parts: Sequence[int] | int = ()) -> dict[str, Any]:
    item: dict[str, Any] = {"path": c.path, "reason": reason}
    if c.part_size is not None:
        item["parts_missing"] = list(range(1, parts + 1)) if isinstance(parts, int) else list(parts)
    return item


def _checksum_problem(c: Component, stored: str | None, client: str | None) -> str | None:
    """Why the stored bytes are not the client's (or the manifest's sha256), or None.

    ``stored`` is the whole-file checksum value storage knows in the asset's algorithm (None
    when it cannot, as on S3 before completion): then the manifest's and the client's can
    still contradict each other.
    """
    algorithm = c.receipt_algorithm
    # The manifest's whole-file sha256 is comparable when the value is a plain sha256.
    plain_sha256 = c.algorithm is None or (algorithm == _checksum.SHA256 and c.part_size is None)
    if stored is not None:
        if client is not None and stored != client:
            return (
                f"checksum mismatch: stored {algorithm}:{stored}, "
                f"the client computed {algorithm}:{client}"
            )
        if plain_sha256 and c.sha256 is not None and stored != c.sha256:
            return f"checksum mismatch: stored sha256 {stored}, the manifest says {c.sha256}"
        return None
    if plain_sha256 and c.sha256 is not None and client is not None and c.sha256 != client:
        return f"checksum mismatch: the client computed {client}, the manifest says {c.sha256}"
    return None


def _incomplete(asset_id: str, missing: list[dict[str, Any]], total: int) -> APIError:
    shown = ", ".join(f"{m['path']} ({m['reason']})" for m in missing[:SHOWN_IN_MESSAGE])
    more = f" and {len(missing) - SHOWN_IN_MESSAGE} more" if len(missing) > SHOWN_IN_MESSAGE else ""
    return APIError(
        409,
        "asset_incomplete",
        f"asset {asset_id} is missing {len(missing)} of {total} components: {shown}{more}; "
        "upload them and finalize again",
        missing=missing,
    )
