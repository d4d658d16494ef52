"""Finalize: verify that storage holds every component of an asset, then make it visible.

Under the asset's lock, every manifest component is checked in storage (size, and sha256 where
it can be known), storage seals what it must (fsync, S3 multipart completion), and only then
does ``pending -> finalized`` commit, in one transaction. What failed verification is forgotten
(its records, and for whole components its bytes) so that the client sends it again; a
repeated finalize returns the finalized asset.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from methodic.server.errors import APIError, conflict, invalid, not_found
from methodic.server.records import AssetRecords
from methodic.server.storage.base import Component

SHOWN_IN_MESSAGE = 5


class Finalizer:
    def __init__(self, records: AssetRecords) -> None:
        self.records = records

    def finalize(self, asset_id: str, checksums: Mapping[str, str]) -> dict[str, Any]:
        with self.records.locks.hold(asset_id):
            asset, components = self.records.load(asset_id)
            unknown = set(checksums) - {c.path for c in components}
            if unknown:
                shown = sorted(unknown)[:SHOWN_IN_MESSAGE]
                raise invalid(
                    f"checksums name paths that are not components of asset {asset_id}: {shown}"
                )
            if asset["state"] == "finalized":
                self._check_refinalize(asset_id, components, checksums)
                return self.records.with_components(asset, components)
            self.records.touch(asset_id)
            verdict = self._verify(asset_id, components, checksums)
            if not verdict.missing:
                for c, why in self.records.storage.seal(
                    asset_id, components, self.records.config.finalize_workers
                ):
                    verdict.missing.append(_missing_item(c, why, c.parts))
                    verdict.forget_whole.append(c)
            if verdict.missing:
                self._forget(asset_id, verdict.forget_whole, verdict.forget_parts)
                raise _incomplete(asset_id, verdict.missing, len(components))
            with self.records.db.write(durable=True) as tx:
                tx.executemany(
                    "UPDATE components SET stored_sha256 = ? WHERE asset_id = ? AND idx = ?",
                    ((verdict.sha256[c.index], asset_id, c.index) for c in components),
                )
                cur = tx.execute(
                    "UPDATE assets SET state = 'finalized', finalized_at = ? WHERE id = ? AND state = 'pending'",
                    (time.time(), asset_id),
                )
                if (
                    cur.rowcount == 0
                    and tx.execute("SELECT 1 FROM assets WHERE id = ?", (asset_id,)).fetchone()
                    is None
                ):
                    raise not_found(f"asset {asset_id} was deleted while being finalized")
            return self.records.get_asset(asset_id)

    def _check_refinalize(
        self, asset_id: str, components: list[Component], checksums: Mapping[str, str]
    ) -> None:
        for c in components:
            want = checksums.get(c.path)
            known = c.stored_sha256 or c.sha256
            if want is not None and known is not None and want != known:
                raise conflict(
                    f"asset {asset_id} is already finalized and its {c.path!r} has sha256 {known}, "
                    f"not {want}; upload different content under a new asset id"
                )

    def _verify(
        self, asset_id: str, components: list[Component], checksums: Mapping[str, str]
    ) -> _Verdict:
        verdict = _Verdict()
        found = self.records.storage.inspect(
            asset_id, components, deep=True, workers=self.records.config.finalize_workers
        )
        for c, f in zip(components, found, strict=True):
            if self.records.locks.part_writers[(asset_id, c.index)]:
                verdict.missing.append({"path": c.path, "reason": "upload in progress"})
                continue
            if not f.complete:
                missing = [n for n in range(1, c.parts + 1) if n not in f.parts]
                verdict.missing.append(_missing_item(c, "not stored", missing))
                if c.received:  # receipts say stored, the bytes are gone: forget the receipts
                    verdict.forget_whole.append(c)
                continue
            reason: str | None = None
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
            else:
                reason = _checksum_problem(c, f.sha256, checksums.get(c.path))
            if reason is None:
                verdict.sha256[c.index] = f.sha256 or checksums.get(c.path) or c.sha256
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
                    "UPDATE components SET stored_sha256 = NULL WHERE asset_id = ? AND idx = ?",
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


@dataclass
class _Verdict:
    """What finalize's verification found: what is missing, what to forget, what was verified."""

    missing: list[dict[str, Any]] = field(default_factory=list)
    forget_whole: list[Component] = field(default_factory=list)
    forget_parts: list[tuple[Component, list[int]]] = field(default_factory=list)
    sha256: dict[int, str | None] = field(default_factory=dict)


def _missing_item(c: Component, reason: str, parts: Sequence[int] | int = ()) -> dict[str, Any]:
    item: dict[str, Any] = {"path": c.path, "reason": reason}
    if c.part_size is not None:
        item["parts_missing"] = list(range(1, parts + 1)) if isinstance(parts, int) else list(parts)
    return item


def _checksum_problem(c: Component, stored: str | None, client: str | None) -> str | None:
    """Why the stored bytes are not the manifest's or the client's, or None.

    ``stored`` is the sha256 storage computed (None when it cannot, as on S3): then the
    manifest's and the client's digests can still contradict each other.
    """
    if stored is not None:
        if c.sha256 is not None and stored != c.sha256:
            return f"checksum mismatch: stored sha256 {stored}, the manifest says {c.sha256}"
        if client is not None and stored != client:
            return f"checksum mismatch: stored sha256 {stored}, the client computed {client}"
        return None
    if c.sha256 is not None and client is not None and c.sha256 != client:
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
