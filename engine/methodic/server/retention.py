"""Retention: per run and asset type, keep the newest ``keep_last`` finalized assets.

An older finalized asset is deleted only once ``keep_last`` newer ones are finalized (newer:
created later, so a slow checkpoint that finalizes after a later step's is the older one), so
the newest finalized asset is never deleted, and a pending asset never counts nor goes. The
policy is applied after every finalize of that run and type, and when it is set. A deleted
asset leaves its summary in ``retired`` for ``RETIRED_KEPT_S``: a rank still waiting for it
(its own contribution stored) learns that it was finalized.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from methodic.server.catalog import Catalog
from methodic.server.errors import APIError
from methodic.server.records import AssetRecords
from methodic.server.sweeper import doom, purge

log = logging.getLogger("methodic.server")
RETIRED_KEPT_S = 7 * 24 * 3600.0


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
                " ORDER BY seq DESC LIMIT -1 OFFSET ?",
                (run_id, asset_type, keep),
            )
        ]
        deleted = []
        now = time.time()
        for asset_id in victims:
            with self.records.locks.hold(asset_id):
                try:
                    summary = self.records.summary(asset_id)
                except APIError:
                    continue  # deleted meanwhile
                with self.records.db.write(durable=True) as tx:
                    if (
                        tx.execute(
                            "SELECT 1 FROM assets WHERE id = ? AND state = 'finalized'", (asset_id,)
                        ).fetchone()
                        is None
                    ):
                        continue
                    doom(tx, asset_id)
                    summary["retired_at"] = now
                    tx.execute(
                        "INSERT OR REPLACE INTO retired (asset_id, summary, retired_at)"
                        " VALUES (?, ?, ?)",
                        (asset_id, json.dumps(summary), now),
                    )
                    tx.execute("DELETE FROM retired WHERE retired_at < ?", (now - RETIRED_KEPT_S,))
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
