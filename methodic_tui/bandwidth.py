"""The steps ``+`` and ``-`` move the shared bandwidth cap along (1-2-5 per decade)."""

from __future__ import annotations

MB = 1_000_000
LADDER: tuple[float, ...] = tuple(
    m * 10**e * MB for e in range(0, 4) for m in (1, 2, 5)
)  # 1 MB/s .. 5 GB/s
IDLE_START = 100 * MB  # first "-" with no cap and nothing being sent


def raise_cap(current: float | None) -> float | None:
    """The next step up; above the top step the cap is lifted (None)."""
    if current is None:
        return None
    for step in LADDER:
        if step > current * 1.001:
            return step
    return None


def lower_cap(current: float | None, measured_rate: float = 0.0) -> float:
    """The next step down; from "no cap", the step just below what is being sent now."""
    reference = current if current is not None else measured_rate
    if reference <= 0:
        return IDLE_START
    below = [s for s in LADDER if s < reference * 0.999]
    return below[-1] if below else LADDER[0]
