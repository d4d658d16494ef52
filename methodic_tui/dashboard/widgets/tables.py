"""Tables patched in place: rows keyed by id, only the cells that changed are updated.

Cells are ``rich.text.Text`` (a ``[`` in a file name is never read as markup). Columns have
fixed widths, except the flexible ones, which share what the terminal leaves; one space
starts every cell (``cell_padding`` 0), which fits 80 columns better than Textual's two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.cache import LRUCache
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from methodic import AssetSnapshot, ComponentSnapshot
from methodic_tui import format as fmt

STATE_STYLES = {
    "registered": "dim",
    "queued": "dim",
    "uploading": "cyan",
    "paused": "yellow",
    "interrupted": "yellow",
    "failed": "bold red",
    "lost": "bold red reverse",  # monitor: its uploader stopped beating
    "finalizing": "magenta",
    "waiting": "yellow",
    "finalized": "green",
    "completed": "green",
    "discarded": "dim",
}
BAR_STYLES = {
    "uploading": "cyan",
    "finalized": "green",
    "completed": "green",
    "failed": "red",
    "paused": "yellow",
    "interrupted": "yellow",
    "finalizing": "magenta",
}
SCROLLBAR = 1  # cells kept free for the vertical scrollbar
T = TypeVar("T")


@dataclass(frozen=True)
class Col:
    key: str
    label: str
    width: int  # fixed width, or the minimum of a flexible column
    flex: float = 0.0
    right: bool = False
    most: int = 1000  # a flexible column's maximum


def cell(content: str | Text, style: str = "", right: bool = False) -> Text:
    text = Text.assemble(
        " ",
        content if isinstance(content, Text) else (content, style),
        no_wrap=True,
        overflow="ellipsis",
    )
    if right:
        text.justify = "right"
    return text


def name_cell(name: str, asset_type: str, width: int) -> Text:
    """The asset's name in bold, and its type when the column has room for both."""
    fits = len(name) + len(asset_type) + 2 <= width
    # The space ends the name's run: a run starting with spaces may lose them in an SVG.
    return cell(
        Text.assemble((f"{name} " if fits else name, "bold"), (asset_type if fits else "", "dim"))
    )


def state_cell(state: str, suffix: str = "") -> Text:
    """The state, styled; ``suffix`` (a multi-rank asset's ``6/8``) follows it plain."""
    return cell(f"{state} {suffix}" if suffix else state, STATE_STYLES.get(state, ""))


def _ranks(a: AssetSnapshot) -> str:
    """``6/8``: ranks stored of a multi-rank asset not yet finalized (else nothing)."""
    if a.world_size is None or a.ranks_stored is None or a.state in ("finalized", "discarded"):
        return ""
    return f"{a.ranks_stored}/{a.world_size}"


def progress_cell(done: int, total: int, state: str, width: int) -> Text:
    frac = fmt.fraction(done, total)
    bar = fmt.bar(frac, max(width - 6, 3))
    return Text.assemble(
        " ", (bar, BAR_STYLES.get(state, "")), (f"{fmt.percent(done, total):>5}", ""), no_wrap=True
    )


class LiveTable(DataTable[Text], Generic[T]):
    """Rows keyed by id, each showing one item (a snapshot); ``show`` takes the latest items.

    Only rows on screen (and a margin) are formatted and patched: with thousands of rows a
    refresh costs what the visible ones cost. A row scrolled into view is brought up to date
    as it arrives (``watch_scroll_y``).
    """

    COLUMNS: ClassVar[tuple[Col, ...]] = ()
    MARGIN = 8  # rows formatted beyond the visible ones, so scrolling a little shows no lag

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        # Before DataTable's __init__, whose reactive setters already clear caches.
        self._versions: dict[tuple[str, str], int] = {}  # bumped by each update of a cell
        self._cell_cache: LRUCache[tuple[object, ...], list[list[Segment]]] = LRUCache(4096)
        super().__init__(
            id=id, classes=classes, cursor_type="row", cell_padding=0, zebra_stripes=False
        )
        self._widths = {c.key: c.width for c in self.COLUMNS}
        self._order: list[str] = []  # row keys, top to bottom (rows are only appended)
        self._items: dict[str, T] = {}  # the latest item of each row
        self._drawn: dict[str, tuple[Text, ...]] = {}  # the cells on screen
        self._drawn_items: dict[str, T] = {}  # the items those cells show
        self._blank = tuple(Text("") for _ in self.COLUMNS)

    def on_mount(self) -> None:
        for c in self.COLUMNS:
            label = Text(" " + c.label, justify="right" if c.right else "left", style="bold")
            self.add_column(label, width=c.width, key=c.key)

    # -------------------------------------------------- what subclasses say

    def row(self, item: T) -> Sequence[Text]:
        raise NotImplementedError

    def same(self, a: T, b: T) -> bool:
        """Whether ``b`` would show exactly as ``a`` does."""
        return a == b

    # -------------------------------------------------- updating

    def width_of(self, key: str) -> int:
        return self._widths[key]

    def show(self, items: Iterable[tuple[str, T]]) -> None:
        """Make the rows these items, in this order for new ones; patch the visible changes."""
        items = list(items)
        seen = {key for key, _ in items}
        gone = [k for k in self._order if k not in seen]
        if len(gone) > 64 and 2 * len(gone) > len(self._order):
            # Most of many rows go (another block of files): DataTable's remove_row costs the
            # whole table per row, so start again (a few go one by one: the cursor stays put).
            self.reset()
            gone = []
        for key in gone:
            self.drop(key)
        lo, hi = self._window()
        for key, item in items:
            if key not in self._items:
                visible = lo <= len(self._order) < hi
                cells = tuple(self.row(item)) if visible else self._blank
                self.add_row(*cells, key=key)
                self._order.append(key)
                self._drawn[key] = cells
                if visible:
                    self._drawn_items[key] = item
            self._items[key] = item
        self.patch_visible()

    def patch_visible(self) -> None:
        lo, hi = self._window()
        for key in self._order[lo:hi]:
            item = self._items[key]
            drawn = self._drawn_items.get(key)
            if drawn is not None and self.same(drawn, item):
                continue
            cells = tuple(self.row(item))
            changed = [
                (col.key, now)
                for col, now, before in zip(self.COLUMNS, cells, self._drawn[key], strict=True)
                if now != before
            ]
            if changed:
                self._set_cells(key, changed)
            self._drawn[key] = cells
            self._drawn_items[key] = item

    def _set_cells(self, key: str, changed: list[tuple[str, Text]]) -> None:
        # What update_cell does, except that it repaints the whole table for each cell: here
        # only the row's region is repainted, once, so unchanged rows cost nothing to draw.
        # (Private API; textual is pinned exactly.)
        row = self._data[RowKey(key)]
        for col_key, value in changed:
            row[ColumnKey(col_key)] = value
            self._versions[key, col_key] = self._versions.get((key, col_key), 0) + 1
        self._update_count += 1
        self.refresh_row(self.get_row_index(key))

    def _window(self) -> tuple[int, int]:
        top = int(self.scroll_y)
        height = max(self.size.height, 1)
        return max(top - self.MARGIN, 0), top + height + self.MARGIN

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.patch_visible()

    def redraw(self) -> None:
        """Format every visible row again (e.g. its cells depend on column widths)."""
        self._drawn_items.clear()
        self.patch_visible()

    def drop(self, key: str) -> None:
        if self._items.pop(key, None) is None:
            return
        self._order.remove(key)
        for col in self.COLUMNS:
            self._versions.pop((key, col.key), None)
        self._drawn.pop(key, None)
        self._drawn_items.pop(key, None)
        self.remove_row(key)

    def reset(self) -> None:
        self._versions.clear()
        self._order.clear()
        self._items.clear()
        self._drawn.clear()
        self._drawn_items.clear()
        self.clear()

    # -------------------------------------------------- rendering

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> list[list[Segment]]:
        # DataTable keys its cell cache on one counter that every update_cell bumps, so a
        # single changed cell re-renders every visible cell. Cache in front of it per cell
        # version instead: a refresh renders only the cells that changed. (Private API;
        # textual is pinned exactly.)
        row_key = self._row_locations.get_key(row_index)
        col_key = self._column_locations.get_key(column_index)
        if row_key is None or col_key is None:  # a header or label cell: no row or no column
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        version = self._versions.get((row_key.value, col_key.value), 0)  # type: ignore[arg-type]
        key = (
            row_index,
            row_key,
            col_key,
            version,
            base_style,
            width,
            cursor,
            hover,
            self._show_hover_cursor,
            self._pseudo_class_state,
            self.show_cursor,
        )
        lines = self._cell_cache.get(key)
        if lines is None:
            lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
            self._cell_cache[key] = lines
        return lines

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._cell_cache.clear()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cell_cache.clear()

    def cursor_key(self) -> str | None:
        if not self._order or self.cursor_row < 0 or self.cursor_row >= self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key((self.cursor_row, 0))  # type: ignore[arg-type]
        return row_key.value

    # -------------------------------------------------- widths

    def on_resize(self, event: events.Resize) -> None:
        if self.fit_columns(event.size.width):
            self.redraw()  # cells depend on widths (bars, whether a name's type fits)
        else:
            self.patch_visible()  # taller: more rows on screen

    def fit_columns(self, width: int) -> bool:
        """Share the spare width among the flexible columns; True when a width changed."""
        flex = [c for c in self.COLUMNS if c.flex]
        if not flex:
            return False
        fixed = sum(c.width for c in self.COLUMNS if not c.flex)
        # Each flexible column gets its minimum, then a share of what is left.
        extra = max(width - SCROLLBAR - fixed - sum(c.width for c in flex), 0)
        total = sum(c.flex for c in flex)
        changed = False
        for c in flex:
            w = min(c.width + int(extra * c.flex / total), max(c.most, c.width))
            if self._widths[c.key] != w:
                self._widths[c.key] = w
                self.columns[c.key].width = w  # type: ignore[index]
                changed = True
        if changed:
            # DataTable has no public "set column width"; these are what its own
            # add_column sets (textual is pinned exactly).
            self._require_update_dimensions = True
            self._clear_caches()
            self.refresh()
        return changed


class AssetsTable(LiveTable[AssetSnapshot]):
    COLUMNS = (
        Col("name", "Asset", 16, flex=2.0, most=44),
        Col("state", "State", 12),
        Col("files", "Files", 7, right=True),
        Col("bytes", "Bytes", 15, right=True),
        Col("progress", "Progress", 12, flex=1.0, most=30),
        Col("rate", "Rate", 10, right=True),
        Col("eta", "ETA", 6, right=True),
    )

    def row(self, a: AssetSnapshot) -> list[Text]:
        state = fmt.shown_state(a)
        moving = state == "uploading"
        return [
            name_cell(fmt.name_of(a), a.asset_type, self.width_of("name")),
            state_cell(state, _ranks(a)),
            cell(f"{a.components_done}/{a.component_count}", right=True),
            cell(fmt.size_pair(a.bytes_done, a.bytes_total), right=True),
            progress_cell(a.bytes_done, a.bytes_total, a.state, self.width_of("progress")),
            cell(fmt.rate(a.rate) if moving else fmt.DASH, right=True),
            cell(fmt.duration(a.eta) if moving else fmt.DASH, right=True),
        ]

    def same(self, a: AssetSnapshot, b: AssetSnapshot) -> bool:
        # Components are only in the snapshot of the selected asset: not part of the row.
        return (
            a.state,
            a.bytes_done,
            a.components_done,
            a.rate,
            a.eta,
            a.bytes_total,
            a.component_count,
            a.files_uploading,
            a.ranks_stored,
            a.contribution_stored,
        ) == (
            b.state,
            b.bytes_done,
            b.components_done,
            b.rate,
            b.eta,
            b.bytes_total,
            b.component_count,
            b.files_uploading,
            b.ranks_stored,
            b.contribution_stored,
        )

    def show_assets(self, assets: Sequence[AssetSnapshot]) -> None:
        self.show((a.asset_id, a) for a in assets)


class ComponentsTable(LiveTable[ComponentSnapshot]):
    COLUMNS = (
        Col("path", "File", 14, flex=1.0, most=48),
        Col("state", "State", 11),
        Col("bytes", "Bytes", 13, right=True),
        Col("progress", "Progress", 10, flex=0.3, most=24),
        Col("parts", "Parts", 7, right=True),
        Col("attempts", "Tries", 6, right=True),
        Col("error", "Last error", 10, flex=1.0),
    )

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.asset_id: str | None = None
        self.show_cursor = False  # only while focused: the asset's row is the selection

    def on_focus(self) -> None:
        self.show_cursor = True

    def on_blur(self) -> None:
        self.show_cursor = False

    def highlighted(self) -> ComponentSnapshot | None:
        """The file under the cursor."""
        key = self.cursor_key()
        return None if key is None else self._items.get(key)

    def row(self, c: ComponentSnapshot) -> list[Text]:
        return [
            cell(c.path),
            state_cell(c.state),
            cell(fmt.size_pair(c.bytes_done, c.size), right=True),
            progress_cell(c.bytes_done, c.size, c.state, self.width_of("progress")),
            cell(f"{c.parts_done}/{c.part_count}" if c.part_count else fmt.DASH, right=True),
            cell(str(c.attempts), right=True),
            cell(c.last_error or "", "red"),
        ]

    def show_components(
        self, asset_id: str | None, components: Sequence[ComponentSnapshot]
    ) -> None:
        if asset_id != self.asset_id:
            self.asset_id = asset_id
            self.reset()  # another asset: other rows
        if components or asset_id is None:
            self.show((c.path, c) for c in components)
