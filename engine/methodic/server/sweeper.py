"""Deleted and expired assets: their rows go at once, their stored bytes when storage allows.

``doom`` deletes an asset's rows and remembers (table ``purges``) that its bytes are still to
be removed; ``purge`` removes them. The ``Sweeper`` expires pending assets idle for longer than
``pending_ttl`` and retries unfinished purges, at start and then periodically on its thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

from methodic.server.errors import disk_full
from methodic.server.records import AssetRecords

log = logging.getLogger("methodic.server")


@dataclass(frozen=True)
class SweepReport:
    expired: list[str]  # pending assets idle past the TTL, now deleted
    purged: list[str]  # deleted assets whose stored bytes were removed by this sweep


def doom(tx: sqlite3.Connection, asset_id: str) -> None:
    """Delete the asset's rows, remembering that its stored bytes are still to be removed."""
    tx.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
    tx.execute(
        "INSERT OR REPLACE INTO purges (asset_id, since) VALUES (?, ?)", (asset_id, time.time())
    )


def purge(records: AssetRecords, asset_id: str) -> bool:
    """Remove the stored bytes of a deleted asset; False when the storage failed (retried later)."""
    if (
        records.db.connection()
        .execute("SELECT 1 FROM purges WHERE asset_id = ?", (asset_id,))
        .fetchone()
        is None
    ):
        return True
    try:
        records.storage.delete_asset(asset_id)
    except Exception as exc:
        log.warning(
            "removing the stored bytes of deleted asset %s failed (%s); will retry",
            asset_id,
            exc,
        )
        return False
    with records.db.write() as tx:
        tx.execute("DELETE FROM purges WHERE asset_id = ?", (asset_id,))
    return True


class Sweeper:
    """Expires idle pending assets (``sweep``) at ``start()`` and then every ``interval`` s."""

    def __init__(self, records: AssetRecords, interval: float) -> None:
        self._records = records
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="methodic-sweeper", daemon=True)

    def sweep(self, now: float | None = None) -> SweepReport:
        """Expire pending assets idle for longer than ``pending_ttl``; retry unfinished purges."""
        records = self._records
        ttl = records.config.pending_ttl
        cutoff = (time.time() if now is None else now) - ttl
        idle = [
            row[0]
            for row in records.db.connection().execute(
                "SELECT id FROM assets WHERE state = 'pending' AND touched_at < ?", (cutoff,)
            )
        ]
        expired: list[str] = []
        for asset_id in idle:
            with records.locks.hold(asset_id):
                with records.db.write(durable=True) as tx:
                    cur = tx.execute(
                        "SELECT 1 FROM assets WHERE id = ? AND state = 'pending' AND touched_at < ?",
                        (asset_id, cutoff),
                    )
                    if cur.fetchone() is None:
                        continue  # finalized or used meanwhile
                    doom(tx, asset_id)
                expired.append(asset_id)
        if expired:
            log.warning(
                "expired %d pending asset(s) idle for over %g s: %s",
                len(expired),
                ttl,
                ", ".join(expired[:10]),
            )
        doomed = [row[0] for row in records.db.connection().execute("SELECT asset_id FROM purges")]
        purged = []
        for asset_id in doomed:
            with records.locks.hold(asset_id):
                if purge(records, asset_id):
                    purged.append(asset_id)
        return SweepReport(expired, purged)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception as exc:  # a storage or database hiccup must not end the sweeping
                if disk_full(exc):
                    log.warning(
                        "the sweep of expired pending assets found the disk full (%s); "
                        "trying again later",
                        exc,
                    )
                else:
                    log.exception("the sweep of expired pending assets failed; trying again later")
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
