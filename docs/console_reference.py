"""The key tables of docs/console.md, generated from the console's own bindings so that no
key goes undocumented: `make docs` rewrites the part between the markers, and
tests/test_docs.py fails when it is stale."""

from __future__ import annotations

import inspect
import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textual.binding import Binding  # noqa: E402
from textual.screen import Screen  # noqa: E402

from tui import modals  # noqa: E402
from tui.app import ConsoleApp  # noqa: E402
from tui.view import TableView, View  # noqa: E402
from tui.views import COMMANDS  # noqa: E402
from tui.widgets import ResourceTable  # noqa: E402

DOC = ROOT / "docs" / "console.md"
START, END = "<!-- keys:start -->", "<!-- keys:end -->"
KEY_NAMES = {"escape": "esc", "colon": ":", "question_mark": "?", "slash": "/", "enter": "enter", "space": "space"}


def _key(binding: Binding) -> str:
    keys = []
    for key in binding.key.split(","):
        key = key.strip()
        keys.append(binding.key_display if binding.key_display and "," not in binding.key
                    else KEY_NAMES.get(key, key))
    return " or ".join(f"`{k}`" for k in keys)


def own_bindings(cls: type) -> list[Binding]:
    """The bindings a class adds to those of its bases (described ones only)."""
    bindings = []
    for item in cls.__dict__.get("BINDINGS", []):
        binding = item if isinstance(item, Binding) else Binding(*item)
        if binding.description:
            bindings.append(binding)
    return bindings


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| Key | Does |", "| --- | --- |", *[f"| {key} | {does} |" for key, does in rows]]


def _section(title: str, doc: str | None, bindings: list[Binding]) -> list[str]:
    lines = [f"#### {title}", ""]
    if doc:
        lines += [inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " "), ""]
    if not bindings:
        return lines + ["No keys beyond those of every view.", ""]
    return lines + _table([(_key(b), b.description) for b in bindings]) + [""]


def screens_of(module) -> list[type]:
    """The screens a view module shows (not the bases of others), in source order."""
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, Screen) and obj.__module__ == module.__name__]
    shown = [cls for cls in found if not any(other is not cls and issubclass(other, cls) for other in found)]
    return sorted(shown, key=lambda cls: inspect.getsourcelines(cls)[1])


def offers_delete(cls: type) -> bool:
    """What TableView.check_action decides for ctrl-d, from the class."""
    return issubclass(cls, TableView) and (cls.delete is not TableView.delete
                                           or cls.action_delete is not TableView.action_delete)


def view_bindings(cls: type, generic: dict[str, str]) -> list[Binding]:
    """A view's keys beyond those of every view (`generic`: key -> what it does): its own and
    its bases', a generic key the view gives another meaning, and ctrl-d where the view deletes."""
    effective = {b.key: b for b in own_bindings(TableView) if b.key == "ctrl+d"}
    for base in reversed(cls.__mro__):
        if base.__module__.startswith("tui.views"):  # not Textual's own screen keys, not the frame's
            for binding in own_bindings(base):
                effective[binding.key] = binding
    shown = [b for key, b in effective.items()
             if (offers_delete(cls) if key == "ctrl+d" else generic.get(key) != b.description)]
    return list({(_key(b), b.description): b for b in shown}.values())  # one line for keys shown as one


def reference() -> str:
    lines = [START, "", "### Everywhere", ""]
    generic = [b for cls in (ConsoleApp, View, TableView, ResourceTable) for b in own_bindings(cls)]
    lines += _table([("`↑` `↓` `pgup` `pgdn`", "Move in the table"),
                     *[(_key(b), b.description) for b in generic if b.key != "ctrl+d"]]) + [""]
    lines += ["`ctrl+d` deletes, after a confirmation, in the views whose tables below list it.", ""]
    lines += ["### Dialogs", ""]
    for cls in (modals.ConfirmScreen, modals.FormScreen, modals.SecretScreen, modals.DetailScreen, modals.HelpScreen):
        lines += _section(cls.__name__.removesuffix("Screen"), cls.__doc__, own_bindings(cls))
    lines += ["### Views", ""]
    modules = dict.fromkeys(import_module(c.target.partition(":")[0]) for c in COMMANDS)
    for module in modules:
        for cls in screens_of(module):
            commands = [c for c in COMMANDS if c.target == f"{module.__name__}:{cls.__name__}"]
            title = " ".join(f"`:{c.name}`" for c in commands) or f"{cls.__name__} (opened from a row)"
            doc = cls.__doc__ or (commands[0].description[0].upper() + commands[0].description[1:] + "."
                                  if commands else None)
            lines += _section(title, doc, view_bindings(cls, {b.key: b.description for b in generic}))
    return "\n".join([*lines, END])


def rewritten(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return head + reference() + tail


if __name__ == "__main__":
    DOC.write_text(rewritten(DOC.read_text()))
