"""The console's dialogs: confirm, a form whose API errors keep it open, a new secret shown
once, the key help of a view, and a scrollable detail page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from appliance.admin_client import AdminApiError


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; `y` or enter on Yes confirms, `n` or esc declines."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__(classes="dialog")
        self.question = question

    def compose(self):
        with Vertical(classes="box"):
            yield Label(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


@dataclass(frozen=True)
class Field:
    """A form field: `choices` make it a select; the value is always text (empty: not given)."""

    name: str
    label: str
    value: str = ""
    placeholder: str = ""
    choices: Sequence[str] | None = None
    password: bool = False


class FormScreen(ModalScreen[Any]):
    """Fields, then `submit(values)`: its answer closes the form; an API error is shown and
    the form stays open with what was typed. Enter or ctrl-s submits, esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Save")]
    AUTO_FOCUS = ""  # none: on_mount focuses the first field without scrolling

    def __init__(self, title: str, fields: Sequence[Field], submit: Callable[[dict[str, str]], Awaitable[Any]]):
        super().__init__(classes="dialog")
        self.title_text, self.fields, self.submit = title, list(fields), submit

    def compose(self):
        with Vertical(classes="box form"):
            yield Label(self.title_text, classes="title")
            with VerticalScroll(classes="fields", can_focus=False):  # tab goes field to field
                for field in self.fields:
                    yield Label(field.label, classes="field-label")
                    if field.choices is not None:
                        yield Select([(c, c) for c in field.choices], value=field.value or Select.NULL,
                                     allow_blank=True, compact=True, id=f"field-{field.name}", classes="field")
                    else:
                        yield Input(field.value, placeholder=field.placeholder, password=field.password,
                                    compact=True, id=f"field-{field.name}", classes="field")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        """What is typed as the form opens goes to its first field (its label kept in view)."""
        self.set_focus(self.query(".field").first(), scroll_visible=False)

    def values(self) -> dict[str, str]:
        values = {}
        for field in self.fields:
            widget = self.query_one(f"#field-{field.name}")
            value = widget.value
            values[field.name] = "" if value is Select.NULL or value is None else str(value).strip()
        return values

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        await self.action_submit()

    async def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            await self.action_submit()
        else:
            self.dismiss(None)

    async def action_submit(self) -> None:
        try:
            answer = await self.submit(self.values())
        except (AdminApiError, ValueError) as exc:
            self.app.notify(str(exc), title="Not saved", severity="error", timeout=10)
            return
        self.dismiss(answer)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SecretScreen(ModalScreen[None]):
    """A new key's secret: shown this once, never again; `c` copies it (OSC 52)."""

    BINDINGS = [Binding("escape,enter", "close", "Close"), Binding("c", "copy", "Copy")]

    def __init__(self, title: str, secret: str) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.secret = title, secret

    def compose(self):
        with Vertical(classes="box"):
            yield Label(self.title_text, classes="title")
            yield Static(self.secret, id="secret")
            yield Label("Copy it now: the gateway keeps only its hash and cannot show it again.", classes="warning")
            yield Label("c copies it to the clipboard, enter closes.", classes="hint")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.secret)
        self.app.notify("Copied to the clipboard.")

    def action_close(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The keys of the view it was opened from, and the views that `:` jumps to."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, view: str, keys: Sequence[tuple[str, str]], commands: Sequence[tuple[str, str]]) -> None:
        super().__init__(classes="dialog")
        self.view, self.keys, self.commands = view, keys, commands

    def compose(self):
        keys = Table(title=f"Keys of {self.view}", show_header=False, box=None, padding=(0, 2, 0, 0))
        for key, description in self.keys:
            keys.add_row(f"[bold]{key}[/]", description)
        views = Table(title="Views (: then a name)", show_header=False, box=None, padding=(0, 2, 0, 0))
        for name, description in self.commands:
            views.add_row(f"[bold]:{name}[/]", description)
        with VerticalScroll(classes="box help"):
            with Horizontal(classes="help-columns"):
                yield Static(keys)
                yield Static(views)

    def action_close(self) -> None:
        self.dismiss(None)


def as_yaml(data: Any) -> RenderableType:
    return Syntax(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100), "yaml",
                  theme="ansi_dark", background_color="default", word_wrap=True)


class DetailScreen(ModalScreen[None]):
    """One object in full, scrollable; esc or q closes."""

    BINDINGS = [Binding("escape,q", "close", "Close")]

    def __init__(self, title: str, body: RenderableType) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.body = title, body

    def compose(self):
        with Vertical(classes="box detail"):
            yield Label(self.title_text, classes="title")
            with VerticalScroll():
                yield Static(self.body, id="detail-body")

    def action_close(self) -> None:
        self.dismiss(None)
