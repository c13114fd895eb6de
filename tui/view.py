"""What every view of the console shares: the context line, the `:` and `/` prompt, the help
and back keys, loading off the screen's thread with API errors as notifications; and, for the
list views, a table whose row enter opens and ctrl-d deletes after a confirmation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label

from appliance.admin_client import AdminApiError
from tui.modals import ConfirmScreen, Field, FormScreen, HelpScreen
from tui.widgets import Column, ContextBar, Prompt, ResourceTable

if TYPE_CHECKING:
    from tui.app import ConsoleApp
    from tui.client import Api


class View(Screen):
    """A view: `load()` fills it, every REFRESH_S seconds when set, and on ctrl-r."""

    TITLE: ClassVar[str] = ""
    AUTO_FOCUS = None  # not the hidden prompt
    REFRESH_S: ClassVar[float | None] = None

    BINDINGS = [
        Binding("escape", "back", "Back"),
        # Priority: handled as it arrives, so the keys typed after it (fast, or in one packet
        # over SSH) reach the prompt it opens, not the table under it.
        Binding("colon", "command", "Views", key_display=":", priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+r", "reload", "Refresh"),
    ]

    app: ConsoleApp
    loading = False  # a load is running
    load_again = False  # and another was asked for meanwhile

    def compose(self):
        yield ContextBar(id="context")
        yield Prompt(self.app.command_names())
        yield Label(self.heading(), id="heading")
        yield from self.body()
        yield Footer()

    def body(self):
        return []

    def heading(self) -> str:
        return self.TITLE

    @property
    def api(self) -> Api:
        return self.app.api

    async def load(self) -> None:
        """Fetch and show this view's data."""

    def on_mount(self) -> None:
        self.watch(self.app, "status", lambda _: self.show_context(), init=False)
        self.show_context()
        if self.REFRESH_S:
            self.set_interval(self.REFRESH_S, self.tick)

    def on_screen_resume(self) -> None:
        """Shown (first, or back from a detail, a form or another view): load what is there now."""
        self.reload()

    def show_context(self) -> None:
        self.query_one(ContextBar).show(self.app.api.url, self.app.who, self.app.status, self.TITLE)

    def set_heading(self, text: str) -> None:
        self.query_one("#heading", Label).update(text)

    def reload(self) -> None:
        """Load now; while a load runs, once more when it ends (a slow gateway is never
        asked twice at once, and what an action changed still shows)."""
        if self.loading:
            self.load_again = True
        else:
            self.loading = True
            self._load()

    def tick(self) -> None:
        """A periodic refresh: skipped while the last one still runs, or another screen covers this one."""
        if not self.loading and self.is_current:
            self.reload()

    @work(group="load")
    async def _load(self) -> None:
        try:
            while True:
                self.load_again = False
                try:
                    await self.load()
                except AdminApiError as exc:
                    self.notify(str(exc), title=f"{self.TITLE}: not loaded", severity="error", timeout=8)
                except NoMatches:
                    if self.is_attached and self.app.is_running:
                        raise
                    return  # the view or the app was closed while its answer was on the way
                if not self.load_again:
                    return
        finally:
            self.loading = False

    async def attempt(self, call: Awaitable[Any], done: str | None = None) -> Any:
        """An API call whose error becomes a notification (and None); `done` is said on success."""
        try:
            answer = await call
        except AdminApiError as exc:
            self.notify(str(exc), title="Refused", severity="error", timeout=10)
            return None
        if done:
            self.notify(done)
        return answer

    async def form(self, title: str, fields: Sequence[Field], submit: Callable[[dict[str, str]], Awaitable[Any]],
                   done: Callable[[Any], str]) -> Any:
        """A form whose saved answer is said (`done(answer)`) and shown (a reload); None if cancelled."""
        answer = await self.app.push_screen_wait(FormScreen(title, fields, submit))
        if answer is not None:
            self.notify(done(answer))
            self.reload()
        return answer

    async def confirm(self, question: str) -> bool:
        return bool(await self.app.push_screen_wait(ConfirmScreen(question)))

    def prompt(self) -> Prompt:
        return self.query_one(Prompt)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """While the prompt is open, `:` and `/` are text typed into it."""
        return action not in ("command", "filter") or not self.prompt().display

    def action_command(self) -> None:
        self.prompt().open(":")

    def action_reload(self) -> None:
        self.reload()

    def action_back(self) -> None:
        self.app.back()

    def action_help(self) -> None:
        keys = [(binding.key_display or self.app.get_key_display(binding), binding.description)
                for binding in self.active_bindings_list() if binding.description]
        self.app.push_screen(HelpScreen(self.TITLE, keys, self.app.command_help()))

    def active_bindings_list(self) -> list[Binding]:
        """The view's and the app's own keys (not those of the widget in focus), once each,
        less those this view does not offer (check_action)."""
        seen, bindings = set(), []
        for node in (self, self.app):
            for key_bindings in node._bindings.key_to_bindings.values():
                for binding in key_bindings:
                    if binding.description and binding.description not in seen and \
                            self.check_action(binding.action, ()) is not False:
                        seen.add(binding.description)
                        bindings.append(binding)
        return bindings

    def on_prompt_done(self, message: Prompt.Done) -> None:
        self.focus_main()
        if message.mode == ":" and message.value:
            self.app.run_command(message.value)

    def focus_main(self) -> None:
        """Focus what the keys act on once the prompt closes."""


MARK_COLUMN = Column("marked", "", lambda r: Text("●", style="bold yellow") if r.get("marked") else "")


class Marking:
    """A TableView mixin: space marks one row for an action on two (compare, diff). The row's
    MARK_KEY field names it; rows carry `marked` for a column to show it."""

    MARK_KEY: ClassVar[str] = "id"
    marked: Any = None

    def with_marks(self, rows: list[dict]) -> list[dict]:
        return [r | {"marked": r[self.MARK_KEY] == self.marked} for r in rows]

    def mark(self, value: Any) -> None:
        self.marked = value
        self.table.show(self.with_marks(self.table.all_rows))
        self.rows_shown()

    def mark_note(self) -> str | None:
        """What to say once a row is marked."""
        return None

    def action_mark(self) -> None:
        row = self.selected
        if row is not None:
            self.mark(None if self.marked == row[self.MARK_KEY] else row[self.MARK_KEY])
            if self.marked is not None and (note := self.mark_note()):
                self.notify(note)

    def marked_other(self, row: dict) -> Any:
        """The marked row's key, when it is not `row`'s."""
        return self.marked if self.marked not in (None, row[self.MARK_KEY]) else None


class TableView(View):
    """A list of API objects. Subclasses give COLUMNS, `fetch()`, `key(row)` and, where the API
    allows, `open(row)` and `delete_question(row)` with `delete(row)`."""

    COLUMNS: ClassVar[Sequence[Column]] = ()
    AUTO_FOCUS = "#table"

    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/", priority=True),
        Binding("enter", "open", "Open", show=False),
        Binding("ctrl+d", "delete", "Delete"),
    ]

    def __init__(self, argument: str = "") -> None:
        """`argument`: what `:name TEXT` gave, the table's first filter."""
        super().__init__()
        self.first_filter = argument

    def key(self, row: dict) -> str:
        return str(row["id"])

    async def fetch(self) -> list[dict]:
        raise NotImplementedError

    def body(self):
        yield ResourceTable(self.COLUMNS, self.key, filter=self.first_filter, id="table")

    @property
    def table(self) -> ResourceTable:
        return self.query_one(ResourceTable)

    @property
    def selected(self) -> dict | None:
        return self.table.selected

    async def load(self) -> None:
        self.table.show(await self.fetch())
        self.rows_shown()

    def rows_shown(self) -> None:
        """The rows shown changed (a load, a filter): the heading counts them. A view that
        shows more of its rows (totals, a chart) adds to this."""
        table, shown = self.table, self.table.row_count
        counted = f"{shown}/{len(table.all_rows)}" if table.filter else str(shown)
        self.set_heading(f"{self.heading()} [{counted}]" + (f"  filter: {table.filter}" if table.filter else ""))

    def focus_main(self) -> None:
        self.table.focus()

    def action_filter(self) -> None:
        self.prompt().open("/", self.table.filter)

    def on_prompt_changed(self, message: Prompt.Changed) -> None:
        if message.mode == "/":
            self.table.set_filter(message.value)
            self.rows_shown()

    def on_prompt_done(self, message: Prompt.Done) -> None:  # View's handler runs too (Textual calls each class's)
        if message.mode == "/":
            self.table.set_filter(message.value or "")
            self.rows_shown()

    def action_back(self) -> None:
        if self.table.filter:
            self.table.set_filter("")
            self.rows_shown()
        else:
            super().action_back()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    @work(group="action")
    async def action_open(self) -> None:
        row = self.selected
        if row is not None:
            await self.open(row)

    async def open(self, row: dict) -> None:
        """What enter on a row does."""

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """ctrl-d is not offered where the view deletes nothing."""
        if action == "delete":
            return type(self).delete is not TableView.delete or type(self).action_delete is not TableView.action_delete
        return super().check_action(action, parameters)

    def delete_question(self, row: dict) -> str | None:
        """The confirmation ctrl-d asks for `row`; None where this view deletes nothing."""
        return None

    async def delete(self, row: dict) -> None:
        raise NotImplementedError

    @work(group="action")
    async def action_delete(self) -> None:
        row = self.selected
        question = None if row is None else self.delete_question(row)
        if question is None:
            self.notify("Nothing to delete here.", severity="warning")
        elif await self.confirm(question):
            await self.delete(row)
            self.reload()
