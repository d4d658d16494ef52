"""The header, the bandwidth sparkline and the event log."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import RichLog, Sparkline

from methodic import PoolSnapshot
from methodic_tui import format as fmt
from methodic_tui.dashboard.session import LogEntry
from methodic_tui.source import Labels


class LiveText(Widget):
    """Text that changes a few times a second without re-laying out the screen.

    ``Static.update`` asks for a full layout on every call (its size may follow its content);
    here only a change in the number of lines does.
    """

    DEFAULT_CSS = "LiveText { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._text = Text()

    def render(self) -> Text:
        return self._text

    def show(self, text: Text) -> None:
        if text == self._text:
            return
        old, self._text = self._text, text
        relayout = (
            old.plain.count("\n") != text.plain.count("\n")
            or max(map(len, text.plain.split("\n")), default=0) > self.size.width
        )
        self.refresh(layout=relayout)


class StatusHeader(LiveText):
    """Two lines: where (mode, server, run, workers, tracker) and how it goes (rate, ETA...).

    Fitted to its width: on a narrow terminal the long forms give way to short ones, so that
    the server, the run and the state (paused, failed...) stay readable; what is cut at the
    end of a line (the tracker, the cap) is shown elsewhere (``status``, the chart's title).
    """

    _last: tuple[Labels, PoolSnapshot, str | None] | None = None

    def show_status(self, labels: Labels, snap: PoolSnapshot, read_only: str | None) -> None:
        self._last = (labels, snap, read_only)
        self.show(header_text(labels, snap, read_only, width=self.size.width or None))

    def on_resize(self) -> None:
        if self._last is not None:
            self.show_status(*self._last)


def _field(text: Text, value: str, style: str = "", label: str = "") -> None:
    """Append `` │ label value``: a dim bar sets each field off from the one before.

    No styled run starts with spaces before its glyphs (SVG renderers may drop those).
    """
    text.append(" ")
    text.append(f"│ {label} " if label else "│ ", "dim")
    text.append(value, style)


def sending(snap: PoolSnapshot) -> bool:
    return any(a.state == "uploading" for a in snap.assets)


def current_rate(snap: PoolSnapshot) -> str:
    """The send rate, or why there is none: the meter's average lags a pause by seconds, so
    with no asset uploading the rate is 0 at once."""
    if sending(snap) and snap.rate > 0:
        return fmt.rate(snap.rate)
    if any(a.state == "paused" for a in snap.assets):
        return "paused"
    return "idle"


def cap_text(labels: Labels, snap: PoolSnapshot) -> str:
    return "cap unknown" if not labels.cap_known else fmt.cap(snap.bandwidth_cap)


# How the first line gives way on a narrow terminal, one step after the other.
_WHERE_STEPS = ("full", "short url", "short local", "mode badge", "no labels", "local badge")


def _where(labels: Labels, read_only: str | None, step: int) -> tuple[Text, int]:
    """The first line at a compactness step, and the cells of its essential part (to the run)."""
    at = _WHERE_STEPS.index
    where = Text(no_wrap=True, overflow="ellipsis")
    if step >= at("mode badge") and labels.mode:
        where.append(f" {labels.mode} ", "bold reverse")  # the mode says what this is
    else:
        where.append(" methodic ", "bold reverse")
        if labels.mode:
            where.append(" ")
            where.append(labels.mode, "bold")
    if read_only:
        where.append(" ")
        where.append(" READ-ONLY ", "bold black on yellow")
    if labels.local_only:
        where.append(" ")
        local = (
            " LOCAL "
            if step >= at("local badge")
            else " LOCAL: bytes stay here "
            if step >= at("short local")
            else " LOCAL: bytes stay on this machine "
        )
        where.append(local, "bold black on yellow")
    labelled = step < at("no labels")
    if labels.server:
        server = labels.server
        if step >= at("short url"):
            server = server.split("://", 1)[-1]
        _field(where, server, label="server" if labelled else "")
    if labels.run:
        _field(where, labels.run, label="run" if labelled else "")
    essential = where.cell_len
    return where, essential


def where_line(
    labels: Labels, snap: PoolSnapshot, read_only: str | None, width: int | None = None
) -> Text:
    """Who and where; with ``width``, the first of the forms whose essential part fits."""
    step = 0
    where, essential = _where(labels, read_only, step)
    while width is not None and essential > width and step < len(_WHERE_STEPS) - 1:
        step += 1
        where, essential = _where(labels, read_only, step)
    labelled = step < _WHERE_STEPS.index("no labels")
    if snap.workers:
        _field(where, str(snap.workers), label="workers" if labelled else "")
    if labels.tracker:
        _field(where, labels.tracker, label="tracker" if labelled else "")
    return where


def _how(labels: Labels, snap: PoolSnapshot, short: bool) -> Text:
    counts = fmt.count_states(snap)
    assets = [a for a in snap.assets if a.state != "discarded"]
    done = sum(a.bytes_done for a in assets)
    total = sum(a.bytes_total for a in assets)
    how = Text(no_wrap=True, overflow="ellipsis")
    how.append(" ")
    how.append("↑ ", "bold")
    how.append(current_rate(snap), "bold cyan")
    _field(how, fmt.duration(snap.eta if sending(snap) else None), label="ETA")
    _field(how, f"{fmt.size_pair(done, total)} {fmt.percent(done, total)}")
    _field(how, f"{counts.get('finalized', 0)}/{len(assets)} done")
    paused = counts.get("paused", 0)
    if counts.get("failed"):
        _field(how, f"{counts['failed']} failed", "bold red")
    if paused and paused == len(assets) - counts.get("finalized", 0) - counts.get("failed", 0):
        _field(how, "PAUSED", "bold black on yellow")
    elif paused:
        _field(how, f"{paused} paused", "yellow")
    if counts.get("interrupted"):
        held = "interrupted (u)" if short else "from an earlier process (u resumes)"
        _field(how, f"{counts['interrupted']} {held}", "yellow")
    if assets and counts.get("finalized", 0) == len(assets):
        _field(how, "✓ all finalized" if short else "✓ all finalized (q quits)", "bold green")
    # Last: the cap is also in the chart's title.
    _field(how, cap_text(labels, snap), "dim")
    return how


def header_text(
    labels: Labels, snap: PoolSnapshot, read_only: str | None, width: int | None = None
) -> Text:
    where = where_line(labels, snap, read_only, width)
    how = _how(labels, snap, short=False)
    if width is not None and how.cell_len > width:
        how = _how(labels, snap, short=True)
    text = Text("\n", no_wrap=True, overflow="ellipsis").join([where, how])
    text.no_wrap = True
    return text


class BandwidthPanel(Vertical):
    """The last minute of the total send rate, bars from 0 up to the peak the scale line names."""

    def compose(self) -> ComposeResult:
        yield LiveText(id="bandwidth-scale")
        yield Sparkline([], summary_function=max, id="sparkline")

    def show(self, snap: PoolSnapshot, labels: Labels) -> None:
        title = f"↑ {current_rate(snap)} · {cap_text(labels, snap)}"
        if len(title) + 2 > self.size.width:  # narrow: "↑ 24.6 MB/s ≤ 25 MB/s"
            capped = labels.cap_known and snap.bandwidth_cap
            title = f"↑ {current_rate(snap)}" + (
                f" ≤ {fmt.rate(snap.bandwidth_cap)}" if capped else ""
            )
        if self.border_title != title:
            self.border_title = title
        history = list(snap.history)
        peak = max(history, default=0.0)
        # No samples, or none with bytes: no bars (one sample alone would fill the height).
        # A 0 first keeps the bars' scale from 0, not from the lowest sample.
        data = [0.0, *history] if peak > 0 else []
        scale = Text(f"peak {fmt.rate(peak)}" if peak > 0 else "no samples yet", "dim")
        self.query_one("#bandwidth-scale", LiveText).show(scale)
        spark = self.query_one(Sparkline)
        if list(spark.data or []) != data:
            spark.data = data


class EventLog(RichLog):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id, max_lines=1000, wrap=True, markup=False, highlight=False, min_width=20
        )

    def add(self, entries: Iterable[LogEntry]) -> None:
        for entry in entries:
            self.write(entry.render())
