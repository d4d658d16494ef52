"""The blob ledger: the metadata side of every presigned PUT and GET (receiving backends).

A PUT is ``begin_upload`` (does the asset take it? open its destination), the body, then
``complete_upload`` (commit the bytes and record them under the asset's lock, together with
the asset's other PUTs that finished meanwhile: ``_GroupCommit``) and always ``end_upload``; a GET is ``open_download`` of a finalized component. Every method blocks.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from methodic.server.errors import APIError, conflict, invalid, not_found
from methodic.server.records import AssetRecords, component_of
from methodic.server.signing import Grant
from methodic.server.storage.base import (
    BlobKey,
    Component,
    Received,
    Receiver,
    Upload,
    part_range,
)


@dataclass
class UploadSlot:
    """A PUT between ``begin_upload`` and ``end_upload``."""

    key: BlobKey
    part: int | None
    upload: Upload
    algorithm: str = "sha256"  # of the receipt digest (the asset's)
    checksum: str | None = None  # hex digest the body must have (a bound URL's)
    wrote: bool = True  # the body is written (False: a stored part's body, only checked)
    expected_sha256: str | None = None  # the manifest's, checked when a whole-file PUT ends


@dataclass(eq=False)
class _Receipt:
    """A verified body waiting to be published and recorded (``BlobLedger.complete_upload``)."""

    slot: UploadSlot
    received: Received
    error: BaseException | None = None
    lead: bool = False  # its thread records the next group of its asset
    done: threading.Event = field(default_factory=threading.Event)


class _GroupCommit:
    """Receipts of one asset that arrive while one is being recorded are recorded together,
    in one transaction by one thread (as databases group commits), instead of each PUT taking
    the asset's lock and a transaction of its own in turn. A group is what waited during the
    previous one; its thread then hands the next group to one of that group's threads, so no
    thread records others' receipts for long."""

    def __init__(self, record: Callable[[str, list[_Receipt]], None]) -> None:
        self._record = record
        self._mutex = threading.Lock()
        self._waiting: dict[str, list[_Receipt]] = {}  # per asset; present: a group is recording

    def commit(self, receipt: _Receipt) -> None:
        """Record ``receipt`` (with the others of its asset waiting); raises its error."""
        asset_id = receipt.slot.key.asset_id
        with self._mutex:
            waiting = self._waiting.get(asset_id)
            if waiting is None:
                self._waiting[asset_id] = []
                receipt.lead = True
            else:
                waiting.append(receipt)
        if not receipt.lead:
            receipt.done.wait()
        if receipt.lead:
            self._lead(asset_id, receipt)
        if receipt.error is not None:
            raise receipt.error

    def _lead(self, asset_id: str, first: _Receipt) -> None:
        group = [first]
        if first.done.is_set():  # handed over: the group is what waited, itself included
            with self._mutex:
                group, self._waiting[asset_id] = self._waiting[asset_id], []
        try:
            self._record(asset_id, group)
        except BaseException as exc:  # the transaction failed: nothing of the group recorded
            for receipt in group:
                receipt.error = receipt.error or exc
        finally:
            with self._mutex:
                waiting = self._waiting[asset_id]
                if waiting:
                    waiting[0].lead = True
                    waiting[0].done.set()
                else:
                    del self._waiting[asset_id]
            for receipt in group:
                if receipt is not first:
                    receipt.done.set()


class BlobLedger:
    def __init__(self, records: AssetRecords) -> None:
        self.records = records
        self._commits = _GroupCommit(self._record)

    def _receiver(self) -> Receiver:
        receiver = self.records.storage.receiver
        if receiver is None:
            raise not_found(
                f"this server's storage is {self.records.storage.describe()}: blobs are not sent here"
            )
        return receiver

    def _upload_component(self, conn: sqlite3.Connection, grant: Grant) -> Component:
        row = conn.execute(
            "SELECT state, checksum_algorithm FROM assets WHERE id = ?", (grant.asset_id,)
        ).fetchone()
        if row is None:
            raise not_found(f"asset {grant.asset_id} does not exist")
        if row["state"] != "pending":
            raise conflict(f"asset {grant.asset_id} is finalized; it takes no more uploads")
        c = conn.execute(
            "SELECT * FROM components WHERE asset_id = ? AND path = ?", (grant.asset_id, grant.path)
        ).fetchone()
        if c is None:
            raise not_found(f"asset {grant.asset_id} has no component {grant.path[:300]!r}")
        if c["checksum"] is not None:  # a multi-rank asset's contribution, stored and verified
            raise conflict(
                f"component {grant.path[:300]!r} of asset {grant.asset_id} is stored and "
                "verified; it takes no more uploads"
            )
        return component_of(c, row["checksum_algorithm"])

    def begin_upload(self, grant: Grant) -> UploadSlot:
        """Check that the asset takes this PUT and open its destination. Raises APIError."""
        receiver = self._receiver()
        if grant.part is None:
            # A whole object goes to a temp file of its own, and complete_upload checks the
            # asset again under its lock before anything is published: no lock needed here.
            return self._begin(receiver, grant)
        with self.records.locks.hold(grant.asset_id):  # a part's receipt and writers are shared
            return self._begin(receiver, grant)

    def _begin(self, receiver: Receiver, grant: Grant) -> UploadSlot:
        c = self._upload_component(self.records.db.connection(), grant)
        key = c.key(grant.asset_id)
        expected: tuple[int | None, int, int] | None
        if c.part_size is None:
            expected = (None, 0, c.size)
        elif grant.part is not None and 1 <= grant.part <= c.parts:
            expected = (grant.part, *part_range(c.size, c.part_size, grant.part))
        else:
            expected = None
        if expected != (grant.part, grant.offset, grant.length):
            raise invalid(
                f"this URL does not match the layout of component {c.path!r}; presign again"
            )
        assert grant.length is not None and grant.offset is not None
        algorithm = c.receipt_algorithm
        bound: str | None = None
        if grant.checksum is not None:
            claimed, _, bound = grant.checksum.partition(":")
            if claimed != algorithm:
                raise invalid(
                    f"this URL is bound to a {claimed} digest, but asset {grant.asset_id} "
                    f"uses {algorithm}; presign again"
                )
        if grant.part is None:
            upload = receiver.open_object_upload(
                key, grant.length, algorithm, sha256=c.sha256 is not None
            )
            return UploadSlot(key, None, upload, algorithm, bound, expected_sha256=c.sha256)
        # A bound part whose receipt already has that digest is stored: its body is checked,
        # not written, so a leaked URL replayed with other bytes destroys nothing.
        stored = bound is not None and bound == self._part_digest(key, grant.part)
        upload = receiver.open_part_upload(
            key, grant.offset, grant.length, algorithm, stored=stored
        )
        if not stored:  # a body written into the file: finalize knows it
            self.records.locks.part_writers.setdefault((key.asset_id, key.index), set()).add(upload)
        return UploadSlot(key, grant.part, upload, algorithm, bound, wrote=not stored)

    def complete_upload(self, slot: UploadSlot, received: Received) -> None:
        """Make the received bytes the component's (or part's) and record them."""
        key = slot.key
        if slot.checksum is not None and received.digest != slot.checksum:
            self._forget_part(slot)
            what = key.path if slot.part is None else f"part {slot.part} of {key.path}"
            raise APIError(
                400,
                "checksum_mismatch",
                f"checksum mismatch: the body of {what!r} has {slot.algorithm} {received.digest}, "
                f"the URL was presigned for {slot.checksum}; nothing was stored",
            )
        body_sha256 = received.digest if slot.algorithm == "sha256" else received.sha256
        if slot.expected_sha256 is not None and body_sha256 != slot.expected_sha256:
            raise invalid(
                f"checksum mismatch: the body of {key.path!r} has sha256 {body_sha256}, "
                f"the manifest says {slot.expected_sha256}; nothing was stored"
            )
        self._commits.commit(_Receipt(slot, received))

    def _record(self, asset_id: str, receipts: list[_Receipt]) -> None:
        """Publish and record ``receipts`` of one asset in one transaction, under its lock;
        each receipt refused or failed gets its ``error``."""
        with self.records.locks.hold(asset_id), self.records.db.write() as tx:
            row = tx.execute("SELECT state FROM assets WHERE id = ?", (asset_id,)).fetchone()
            if row is None:
                raise not_found(f"asset {asset_id} was deleted during the upload")
            if row["state"] != "pending":
                raise conflict(f"asset {asset_id} was finalized during the upload")
            for receipt in receipts:
                try:
                    self._record_one(tx, receipt.slot, receipt.received)
                except (APIError, OSError) as exc:  # this PUT only; nothing of it recorded
                    receipt.error = exc
            tx.execute("UPDATE assets SET touched_at = ? WHERE id = ?", (time.time(), asset_id))

    @staticmethod
    def _record_one(tx: sqlite3.Connection, slot: UploadSlot, received: Received) -> None:
        key = slot.key
        settled = tx.execute(
            "SELECT checksum FROM components WHERE asset_id = ? AND idx = ?",
            (key.asset_id, key.index),
        ).fetchone()
        if settled is not None and settled[0] is not None:
            raise conflict(f"{key.path!r} was stored and verified during the upload")
        slot.upload.commit()
        bound = slot.checksum is not None
        if slot.part is None:
            tx.execute(
                "UPDATE components SET stored_digest = ?, stored_bound = ?"
                " WHERE asset_id = ? AND idx = ?",
                (received.digest, bound, key.asset_id, key.index),
            )
        else:
            tx.execute(
                "INSERT OR REPLACE INTO parts (asset_id, idx, part, size, digest, bound)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key.asset_id, key.index, slot.part, received.size, received.digest, bound),
            )

    def _part_digest(self, key: BlobKey, part: int) -> str | None:
        row = (
            self.records.db.connection()
            .execute(
                "SELECT digest FROM parts WHERE asset_id = ? AND idx = ? AND part = ?",
                (key.asset_id, key.index, part),
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def _forget_part(self, slot: UploadSlot) -> None:
        """A part body that was refused was written in place: the part's earlier receipt (if
        any) no longer describes the bytes at its offset."""
        if slot.part is None or not slot.wrote:
            return
        key = slot.key
        with self.records.locks.hold(key.asset_id), self.records.db.write() as tx:
            tx.execute(
                "DELETE FROM parts WHERE asset_id = ? AND idx = ? AND part = ?",
                (key.asset_id, key.index, slot.part),
            )

    def end_upload(self, slot: UploadSlot) -> None:
        """Release the slot whatever happened; a body that was not completed leaves no trace."""
        slot.upload.abort()
        if slot.part is not None and slot.wrote:
            with self.records.locks.hold(slot.key.asset_id):
                writers = self.records.locks.part_writers
                index = (slot.key.asset_id, slot.key.index)
                writers.get(index, set()).discard(slot.upload)
                if not writers.get(index, True):
                    del writers[index]

    def open_download(self, asset_id: str, path: str) -> tuple[BinaryIO, Component]:
        receiver = self._receiver()
        with self.records.db.read() as conn:
            row = conn.execute(
                "SELECT state, checksum_algorithm FROM assets WHERE id = ?", (asset_id,)
            ).fetchone()
            c = conn.execute(
                "SELECT * FROM components WHERE asset_id = ? AND path = ?", (asset_id, path)
            ).fetchone()
        if row is None or row["state"] != "finalized" or c is None:
            raise not_found(f"asset {asset_id} has no finalized component {path[:300]!r}")
        component = component_of(c, row["checksum_algorithm"])
        return receiver.open_read(component.key(asset_id)), component
