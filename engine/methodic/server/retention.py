"""Retention: per run and asset type, keep the newest ``keep_last`` finalized assets.

An older finalized asset is deleted only once ``keep_last`` newer ones are finalized (newest by
``finalized_at``), so the latest finalized asset is never deleted, and a pending asset never
counts nor goes. The policy is applied after every finalize of that run and type, and when it
is set.
"""

from __future__ import annotations

import logging
from typing import Any

from methodic.server.catalog import Catalog
from methodic.server.records import AssetRecords
from methodic.server.sweeper import doom, purge

log = logging.getLogger("methodic.server")


class Retention:
    def __init__(self, records: AssetRecords) -> None:
        self.records = records

    def set(self, catalog: Catalog, run_id: str, asset_type: str, keep_last: int) -> dict[str, Any]:
        """Record the policy (``keep_last`` >= 1), apply it now, and say what it deleted."""
        catalog.get_run(run_id)
        with self.records.db.write(durable=True) as tx:
            tx.execute(
                "INSERT OR REPLACE INTO retention (run_id, asset_type, keep_last) VALUES (?, ?, ?)",
                (run_id, asset_type, keep_last),
            )
        deleted = self.apply(run_id, asset_type)
        return {
            "run_id": run_id,
            "asset_type": asset_type,
            "keep_last": keep_last,
            "deleted": deleted,
        }

    def apply(self, run_id: str, asset_type: str) -> list[str]:
        """Delete the run's finalized assets of this type older than the newest ``keep_last``."""
        conn = self.records.db.connection()
        row = conn.execute(
            "SELECT keep_last FROM retention WHERE run_id = ? AND asset_type = ?",
            (run_id, asset_type),
        ).fetchone()
        if row is None:
            return []
        keep = max(1, int(row[0]))
        victims = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM assets WHERE run_id = ? AND asset_type = ? AND state = 'finalized'"
                " ORDER BY finalized_at DESC, seq DESC LIMIT -1 OFFSET ?",
                (run_id, asset_type, keep),
            )
        ]
        deleted = []
        for asset_id in victims:
            with self.records.locks.hold(asset_id):
                with self.records.db.write(durable=True) as tx:
                    if (
                        tx.execute(
                            "SELECT 1 FROM assets WHERE id = ? AND state = 'finalized'", (asset_id,)
                        ).fetchone()
                        is None
                    ):
                        continue
                    doom(tx, asset_id)
                purge(self.records, asset_id)
            deleted.append(asset_id)
        if deleted:
            log.info(
                "retention of run %s (%s, keep_last=%d) deleted %d older asset(s): %s",
                run_id,
                asset_type,
                keep,
                len(deleted),
                ", ".join(deleted[:10]),
            )
        return deleted
