"""The steps ``+`` and ``-`` move the shared bandwidth cap along (1-2-5 per decade).

``+`` and ``-`` undo each other: a key pressed after the other one returns the cap to exactly
where it was before (a cap off the ladder, such as ``--max-bandwidth 3MB``, or no cap at all),
however many steps were taken, as long as nothing else changed the cap meanwhile.
"""

from __future__ import annotations

from typing import Literal

MB = 1_000_000
LADDER: tuple[float, ...] = tuple(
    m * 10**e * MB for e in range(0, 4) for m in (1, 2, 5)
)  # 1 MB/s .. 5 GB/s
IDLE_START = 100 * MB  # first "-" with no cap and nothing being sent

Cap = float | None  # bytes/s; None: no cap
Direction = Literal["up", "down"]


def raise_cap(current: Cap) -> Cap:
    """The next step up; above the top step the cap is lifted (None)."""
    if current is None:
        return None
    for step in LADDER:
        if step > current * 1.001:
            return step
    return None


def lower_cap(current: Cap, measured_rate: float = 0.0) -> float:
    """The next step down; from "no cap", the step just below what is being sent now."""
    reference = current if current is not None else measured_rate
    if reference <= 0:
        return IDLE_START
    below = [s for s in LADDER if s < reference * 0.999]
    return below[-1] if below else LADDER[0]


class CapSteps:
    """The operator's walk along the ladder, remembered so that each key undoes the other.

    ``next`` says where a key leads from the current cap; ``went`` records a move once the cap
    is set. A move (even one that changed nothing, at either end of the ladder) is undone by
    the opposite key, which returns to the cap it started from.
    """

    def __init__(self) -> None:
        self._trail: list[tuple[Direction, Cap, Cap]] = []  # (key, from, to), latest last

    def next(self, direction: Direction, current: Cap, measured_rate: float = 0.0) -> Cap:
        if self._trail and self._trail[-1][2] != current:
            self._trail.clear()  # the cap was changed by other means: a new walk
        if self._trail and self._trail[-1][0] != direction:
            return self._trail[-1][1]
        if direction == "up":
            return raise_cap(current)
        return lower_cap(current, measured_rate)

    def went(self, direction: Direction, start: Cap, end: Cap) -> None:
        last = self._trail[-1] if self._trail else None
        if last is not None and last[0] != direction and (last[2], last[1]) == (start, end):
            self._trail.pop()  # an undo
        else:
            self._trail.append((direction, start, end))
