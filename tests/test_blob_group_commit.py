"""The blob ledger's group commit: receipts of an asset that arrive while one is recorded are
recorded together by one thread, each still gets its own answer, and a failed transaction
fails its whole group (and only it)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from methodic.server.blobs.ledger import _GroupCommit, _Receipt
from methodic.server.errors import conflict

CEILING_S = 60.0


def receipt(asset_id: str, name: str) -> _Receipt:
    slot: Any = SimpleNamespace(key=SimpleNamespace(asset_id=asset_id), name=name)
    return _Receipt(slot=slot, received=None)  # type: ignore[arg-type]


class Recorder:
    """A ``record`` whose first call blocks until released; later calls fail as told."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.refuse: set[str] = set()  # receipts refused one by one
        self.failing: set[int] = set()  # these calls (0: the first) fail as a whole

    def __call__(self, asset_id: str, receipts: list[_Receipt]) -> None:
        self.groups.append([r.slot.name for r in receipts])  # type: ignore[attr-defined]
        if len(self.groups) == 1:
            self.entered.set()
            assert self.release.wait(CEILING_S)
        if len(self.groups) - 1 in self.failing:
            raise OSError("the transaction failed")
        for r in receipts:
            if r.slot.name in self.refuse:  # type: ignore[attr-defined]
                r.error = conflict("refused")


def commit_in_thread(
    commits: _GroupCommit, r: _Receipt, outcome: dict[str, Any]
) -> threading.Thread:
    def run() -> None:
        try:
            commits.commit(r)
            outcome[r.slot.name] = "ok"  # type: ignore[attr-defined]
        except Exception as exc:
            outcome[r.slot.name] = exc  # type: ignore[attr-defined]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition: Any) -> None:
    while not condition():
        time.sleep(0.001)


def test_receipts_waiting_on_a_commit_are_recorded_together_each_with_its_answer() -> None:
    record = Recorder()
    record.refuse = {"c"}
    commits = _GroupCommit(record)
    outcome: dict[str, Any] = {}
    threads = [commit_in_thread(commits, receipt("asset", "a"), outcome)]
    assert record.entered.wait(CEILING_S)
    for name in "bcd":
        threads.append(commit_in_thread(commits, receipt("asset", name), outcome))
    other = commit_in_thread(commits, receipt("other", "x"), outcome)
    other.join(CEILING_S)  # another asset does not wait for this one's group
    assert outcome == {"x": "ok"}
    wait_until(lambda: len(commits._waiting["asset"]) == 3)
    record.release.set()
    for thread in threads:
        thread.join(CEILING_S)
    assert record.groups == [["a"], ["x"], ["b", "c", "d"]]
    assert {k: v == "ok" for k, v in outcome.items()} == {
        "a": True,
        "b": True,
        "c": False,
        "d": True,
        "x": True,
    }
    assert outcome["c"].status == 409
    assert commits._waiting == {}


def test_a_failed_transaction_fails_its_group_only() -> None:
    record = Recorder()
    commits = _GroupCommit(record)
    outcome: dict[str, Any] = {}
    first = commit_in_thread(commits, receipt("asset", "a"), outcome)
    assert record.entered.wait(CEILING_S)
    threads = [commit_in_thread(commits, receipt("asset", n), outcome) for n in "bc"]
    wait_until(lambda: len(commits._waiting["asset"]) == 2)
    record.failing = {1, 3}  # the group of b and c, then e
    record.release.set()
    for thread in [first, *threads]:
        thread.join(CEILING_S)
    assert outcome["a"] == "ok"
    assert isinstance(outcome["b"], OSError) and isinstance(outcome["c"], OSError)
    commits.commit(receipt("asset", "d"))  # the asset takes receipts again
    assert record.groups[-1] == ["d"]
    with pytest.raises(OSError):
        commits.commit(receipt("asset", "e"))
    assert commits._waiting == {}
