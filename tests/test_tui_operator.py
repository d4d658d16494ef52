"""The operator's keys and words: ``+``/``-`` undo each other, counts are in the right number.

Fixed-data tests drive the real app on a ``StaticSource`` (see tui_data); every wait is on a
condition.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tui_data import MB, held_snapshot, labels, sample_pending, sample_snapshot
from tui_helpers import running, screen_text, settled, until

from methodic import PoolSnapshot
from methodic_tui import bandwidth
from methodic_tui.bandwidth import LADDER, CapSteps
from methodic_tui.dashboard.widgets.tables import ComponentsTable
from methodic_tui.source import Labels, StaticSource
from methodic_tui.status import render

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


# ------------------------------------------------------------------ plurals

PACKAGE = Path(__file__).resolve().parent.parent / "methodic_tui"
COUNTED = {"upload", "file", "asset", "part", "attempt", "checkpoint", "component", "second"}


def _bare_counts(tree: ast.AST) -> list[str]:
    """Text like f"{n} uploads": a formatted value, then a counted noun in the plural."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        parts = [None, *node.values]
        for before, value, after in zip(parts, parts[1:], parts[2:], strict=False):
            if not (isinstance(value, ast.FormattedValue) and isinstance(after, ast.Constant)):
                continue
            if isinstance(before, ast.Constant) and str(before.value).endswith("/"):
                continue  # "{done}/{total} files": a fraction, not a count
            rest = str(after.value)
            words = rest.split()
            if not rest.startswith(" ") or not words:
                continue
            for noun in (words[0], " ".join(words[:2])):
                if any(noun.rstrip(",.;:)").endswith(f"{n}s") for n in COUNTED):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
                    break
    return found


def test_counts_go_through_one_plural_helper() -> None:
    """No message says "1 uploads": a count before a noun uses format.plural."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for where in _bare_counts(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE)} {where}")
    assert not offenders, "\n".join(offenders)


def test_the_guard_finds_a_bare_count() -> None:
    assert _bare_counts(ast.parse('f"{n} uploads unfinished"'))
    assert _bare_counts(ast.parse('f"{n} unfinished uploads"'))
    assert not _bare_counts(ast.parse('f"{done}/{total} files"'))  # a fraction: by the total
    assert not _bare_counts(ast.parse("f\"{plural(n, 'upload')} unfinished\""))


def test_one_of_each_is_singular(tmp_path: Path) -> None:
    (one,) = sample_pending()[:1]
    assert render(tmp_path / "u.sqlite", [one], [], 0.0)[0].endswith(": 1 asset (1 uploading)")
    assert "0 assets" in render(tmp_path / "u.sqlite", [], [], 0.0)[0]


async def test_the_recovery_screen_counts_one_upload() -> None:
    source = StaticSource(held_snapshot(), [], held=sample_pending()[:1], labels=labels())
    async with running(source, size=(80, 24), start_on_recovery=True) as (app, pilot):
        await until(pilot, lambda: "1 unfinished upload from" in screen_text(app))


# ------------------------------------------------------------------ 80 columns


def local_labels() -> Labels:
    return replace(labels(), mode="demo", local_only=True, server="http://127.0.0.1:43517")


async def test_at_80_columns_the_header_keeps_server_run_and_state() -> None:
    snap = sample_snapshot()
    paused = replace(snap, assets=tuple(replace(a, state="paused") for a in snap.assets[1:]))
    for lab in (labels(), local_labels()):
        async with running(StaticSource(paused, labels=lab), size=(80, 24)) as (app, pilot):
            await until(pilot, lambda: "PAUSED" in screen_text(app))
            first, second = screen_text(app).split("\n")[:2]
            assert "127.0.0.1:" in first and lab.server.rsplit(":", 1)[1] in first, first
            assert "demo v0 r0" in first, first
            assert "PAUSED" in second, second
            if lab.local_only:
                assert "LOCAL: bytes stay here" in first, first
    # Wide enough: every word of the long form.
    async with running(StaticSource(paused, labels=local_labels()), size=(120, 40)) as (app, _):
        assert "LOCAL: bytes stay on this machine" in screen_text(app)
        assert "server http://127.0.0.1:43517" in screen_text(app)


async def test_at_80x24_every_file_of_a_long_list_can_be_reached() -> None:
    snap = sample_snapshot()
    many = tuple(
        replace(snap.assets[1].components[0], path=f"model-{i:05d}-of-00030.safetensors")
        for i in range(1, 31)
    )
    big = replace(snap.assets[1], components=many, component_count=len(many))
    source = StaticSource(replace(snap, assets=(snap.assets[0], big)), labels=labels())
    async with running(source, size=(80, 24)) as (app, pilot):
        await pilot.press("down")
        files = app.screen.query_one(ComponentsTable)
        await until(pilot, lambda: files.row_count == 30)
        # The pane says that some are hidden, and how to reach them.
        await until(pilot, lambda: "of 30 shown, tab scrolls" in screen_text(app))
        await pilot.press("tab")
        assert files.has_focus
        for i in range(1, 31):
            name = f"model-{i:05d}-of-00030.safetensors"
            # The highlighted file in full, even where its column cuts the name.
            await until(pilot, lambda: f"{i}/30: {name}" in screen_text(app))  # noqa: B023
            if i < 30:
                await pilot.press("down")
        assert files.scroll_y > 0  # the list scrolled: the last rows are on screen
        assert "model-00030-of-…" in screen_text(app)
