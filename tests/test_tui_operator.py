"""The operator's keys: ``+``/``-`` undo each other.

Fixed-data tests drive the real app on a ``StaticSource`` (see tui_data); every wait is on a
condition.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from tui_data import MB, labels, sample_snapshot
from tui_helpers import running, settled, until

from methodic import PoolSnapshot
from methodic_tui import bandwidth
from methodic_tui.bandwidth import LADDER, CapSteps
from methodic_tui.source import StaticSource

# Caps to start from: none, both ends of the ladder, on it and off it.
STARTS: list[float | None] = [None, LADDER[0], LADDER[-1], 20 * MB, 3 * MB, 0.3 * MB, 7e9]
starts = st.sampled_from(STARTS) | st.floats(min_value=1e3, max_value=1e11)
keys = st.lists(st.sampled_from(["up", "down"]), max_size=12)


def press(steps: CapSteps, key: bandwidth.Direction, cap: float | None) -> float | None:
    """What the operator does with a key (operator.Operator._step_cap), minus the app."""
    after = steps.next(key, cap, measured_rate=24.6 * MB)
    steps.went(key, cap, after)
    return after


def undo(key: bandwidth.Direction) -> bandwidth.Direction:
    return "down" if key == "up" else "up"


@given(start=starts, walk=keys)
def test_the_opposite_keys_walk_back_to_exactly_where_it_started(
    start: float | None, walk: list[bandwidth.Direction]
) -> None:
    steps = CapSteps()
    cap = start
    for key in walk:
        cap = press(steps, key, cap)
    for key in reversed(walk):
        cap = press(steps, undo(key), cap)
    assert cap == start


@given(start=starts, first=st.sampled_from(["up", "down"]), times=st.integers(1, 20))
def test_a_key_and_its_opposite_alternate_between_two_caps(
    start: float | None, first: bandwidth.Direction, times: int
) -> None:
    steps = CapSteps()
    there = press(steps, first, start)
    cap = there
    for i in range(times):
        cap = press(steps, undo(first) if i % 2 == 0 else first, cap)
        assert cap == (start if i % 2 == 0 else there)


def test_the_ladder_still_steps_when_nothing_is_undone() -> None:
    steps = CapSteps()
    assert press(steps, "down", None) == 20 * MB  # from no cap: the step below the rate
    assert press(steps, "down", 20 * MB) == 10 * MB
    assert press(steps, "up", 10 * MB) == 20 * MB  # undo
    assert press(steps, "up", 20 * MB) is None  # undo: no cap again
    assert press(steps, "up", None) is None  # nothing above no cap
    # The cap changed by other means (e.g. the engine's own setting): a new walk from there.
    assert press(steps, "up", 3 * MB) == 5 * MB
    assert press(steps, "up", 5 * MB) == 10 * MB
    assert press(steps, "down", 7 * MB) == 5 * MB  # 7 is not where the walk left it


async def test_plus_then_minus_and_minus_then_plus_in_the_app() -> None:
    for start in STARTS:
        source = StaticSource(replace_cap(start), labels=labels())
        async with running(source, size=(80, 24)) as (_, pilot):
            for walk in (["plus", "minus"], ["minus", "plus"], ["minus"] * 3 + ["plus"] * 3):
                for key in walk:
                    await pilot.press(key)
                await settled(pilot)
                assert source.fixed.bandwidth_cap == start, (start, walk)
            await pilot.press("plus", "plus", "minus", "minus")
            await until(pilot, lambda: source.fixed.bandwidth_cap == start)  # noqa: B023


def replace_cap(cap: float | None) -> PoolSnapshot:
    return replace(sample_snapshot(), bandwidth_cap=cap)
