"""The console's building blocks: the context line, the prompt that `:` and `/` open, the
table every list view shows (filtered as you type, its cursor kept across refreshes) and a
bar chart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.suggester import SuggestFromList
from textual.widget import Widget
from textual.widgets import DataTable, Input, Label, Static

from tui import format as fmt


@dataclass(frozen=True)
class Column:
    """A table column: its heading and how a row's value is shown (default: the field as text)."""

    key: str
    label: str
    show: Callable[[dict], Any] | None = None

    def cell(self, row: dict) -> Any:
        return self.show(row) if self.show else fmt.text(row.get(self.key))


class ResourceTable(DataTable):
    """Rows of API objects; `filter` keeps those with the text in any cell (case-insensitive)."""

    BINDINGS = [Binding("g", "scroll_top", "Top", show=False), Binding("G", "scroll_bottom", "Bottom", show=False)]

    def __init__(self, columns: Sequence[Column], key: Callable[[dict], str], *, filter: str = "", **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.spec = list(columns)
        self.key_of = key
        self.rows_by_key: dict[str, dict] = {}
        self.all_rows: list[dict] = []
        self.filter = filter
        for column in self.spec:  # now, not at mount: rows may arrive before the table is mounted
            self.add_column(column.label, key=column.key)

    def set_columns(self, columns: Sequence[Column]) -> None:
        """Other columns (a view whose rows change shape): the next `show` draws every row anew."""
        self.spec = list(columns)
        self.clear(columns=True)
        self.rows_by_key = {}
        for column in self.spec:
            self.add_column(column.label, key=column.key)

    def show(self, rows: list[dict]) -> None:
        self.all_rows = rows
        self._render_rows()

    def set_filter(self, text: str) -> None:
        self.filter = text
        self._render_rows()

    def _render_rows(self) -> None:
        """Show the rows that pass the filter. Rows as before (the same keys in the same order)
        have only their changed cells redrawn, so a refresh neither flickers nor scrolls."""
        needle = self.filter.casefold()
        shown = {}
        for row in self.all_rows:
            cells = [column.cell(row) for column in self.spec]
            if not needle or any(needle in str(cell).casefold() for cell in cells):
                shown[self.key_of(row)] = (row, cells)
        if list(shown) == list(self.rows_by_key):
            for key, (row, cells) in shown.items():
                for column, cell, before in zip(self.spec, cells, self.get_row(key)):
                    if str(cell) != str(before) or type(cell) is not type(before):
                        self.update_cell(key, column.key, cell, update_width=True)
                self.rows_by_key[key] = row
            return
        selected, scrolled = self.selected_key, self.scroll_y
        self.clear()
        self.rows_by_key = {key: row for key, (row, _) in shown.items()}
        for key, (_, cells) in shown.items():
            self.add_row(*cells, key=key)
        if selected in self.rows_by_key:
            self.move_cursor(row=self.get_row_index(selected), scroll=False)
        self.scroll_y = scrolled

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    @property
    def selected(self) -> dict | None:
        key = self.selected_key
        return None if key is None else self.rows_by_key.get(key)


class ContextBar(Static):
    """The top line: the gateway, who the console acts as, and whether the gateway is ready."""

    def show(self, url: str, who: str, status: str, view: str) -> None:
        style = {"ready": "bold green", "degraded": "bold yellow"}.get(status, "bold red")
        line = Text.assemble((" appliance ", "bold reverse"), " ", (url, "bold"), "  ", who, "  ",
                             (status, style), "  ", (view, "italic"))
        self.update(line)


class Prompt(Horizontal):
    """The line that `:` (a command) and `/` (a filter) open; hidden otherwise."""

    class Done(Message):
        def __init__(self, mode: str, value: str) -> None:
            super().__init__()
            self.mode, self.value = mode, value

    class Changed(Message):
        def __init__(self, mode: str, value: str) -> None:
            super().__init__()
            self.mode, self.value = mode, value

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, commands: Sequence[str]) -> None:
        super().__init__(id="prompt")
        self.commands = list(commands)
        self.mode = ":"

    def compose(self):
        yield Label(":", id="prompt-sign")
        # Disabled while hidden, so it never takes the focus from the view.
        yield Input(id="prompt-input", disabled=True, suggester=SuggestFromList(self.commands, case_sensitive=False))

    def open(self, mode: str, value: str = "") -> None:
        self.mode = mode
        self.query_one(Label).update(mode)
        field = self.query_one(Input)
        field.suggester = SuggestFromList(self.commands, case_sensitive=False) if mode == ":" else None
        field.placeholder = "a view: " + ", ".join(self.commands[:8]) + ", …" if mode == ":" else "filter the rows"
        field.value = value
        field.disabled = False
        self.display = True
        # At once, not after a refresh (as focus() does): keys typed fast, or arriving in one
        # packet over SSH, go to the prompt rather than the table under it.
        self.screen.set_focus(field)

    def close(self) -> None:
        self.display = False
        self.query_one(Input).disabled = True

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.Changed(self.mode, event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.close()
        self.post_message(self.Done(self.mode, event.value.strip()))

    def action_cancel(self) -> None:
        self.close()
        self.post_message(self.Done(self.mode, "" if self.mode == "/" else None))


EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(value: float, largest: float, width: int) -> str:
    """A bar of block characters `width` long for `largest`, in eighths of a character."""
    eighths = round(value / largest * width * 8) if largest > 0 else 0
    full, part = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[part] if part else "")


class BarChart(Widget):
    """Labelled horizontal bars scaled to the largest value, drawn at the widget's width."""

    DEFAULT_CSS = """
    BarChart { height: auto; border: round $secondary; padding: 0 1; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title, self.empty = "", ""
        self.bars: list[tuple[str, float, str]] = []  # label, value, value as shown

    def show(self, title: str, bars: list[tuple[str, float, str]], empty: str) -> None:
        self.title, self.bars, self.empty = title, bars, empty
        self.refresh(layout=True)

    def render(self) -> Group:
        lines = [Text(self.title, style="bold")]
        largest = max((value for _, value, _ in self.bars), default=0)
        if largest <= 0:
            return Group(*lines, Text(self.empty, style="dim"))
        label_width = min(40, max(len(label) for label, _, _ in self.bars))
        value_width = max(len(shown) for _, _, shown in self.bars)
        width = max(10, self.content_size.width - label_width - value_width - 2)
        for label, value, shown in self.bars:
            drawn = bar(value, largest, width).ljust(width)
            lines.append(Text.assemble(label[:label_width].ljust(label_width), " ", (drawn, "cyan"), " ",
                                       shown.rjust(value_width)))
        return Group(*lines)
