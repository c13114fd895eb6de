"""The console's tests drive the real app (Textual's Pilot) against the real shared stack:
gateway, llama.cpp engine, state database and S3 object store. Everything the console
shows arrives over the network, so tests wait for what they expect (`until`) rather than
for a fixed time."""

from __future__ import annotations

import os
import pty
import select
import time
from collections.abc import Callable
from pathlib import Path

import pyte
import pytest
from rich.cells import cell_len

from tests.gateway.conftest import unique  # noqa: F401 (a fixture, shared)
from tui.app import ConsoleApp
from tui.client import Api

WAIT_S = 20.0


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def console(stack):
    """`async with console("keys") as pilot:` a console on the shared stack, opened on a view."""

    def start(view: str = "dashboard", *, key: str | None = None, url: str | None = None,
              size: tuple[int, int] = (160, 45), refresh_s: float = 0.5):
        app = ConsoleApp(Api(url or stack.root, key or stack.admin_key), start=view, refresh_s=refresh_s)
        return app.run_test(size=size)

    return start


async def until(pilot, condition: Callable[[], object], what: str = "", timeout: float = WAIT_S):
    """Let the app run until `condition()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what or condition} on {pilot.app.screen!r}; "
                         f"notifications: {notes(pilot)}; workers: {list(pilot.app.workers)}")


def cells(pilot) -> list[list[str]]:
    """The rows the current view's table shows, as text."""
    table = pilot.app.screen.table
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def laid_out(pilot) -> bool:
    """The current view's table has measured its columns for the rows it holds: DataTable
    does that when the app is next idle, which under load can come after the rows."""
    table = pilot.app.screen.table
    return all(column.content_width >= max((cell_len(str(table.get_cell(row, key))) for row in table.rows), default=0)
               for key, column in table.columns.items())


def column(pilot, name: str) -> list[str]:
    """One column (by its key) of the current view's table, as text."""
    table = pilot.app.screen.table
    return [str(table.get_cell_at((i, table.get_column_index(name)))) for i in range(table.row_count)]


def notes(pilot) -> list[str]:
    """The notifications shown so far."""
    return [n.message for n in pilot.app._notifications]


async def select_row(pilot, text: str) -> None:
    """Move the cursor to the first row with `text` in a cell."""

    def position():  # the row's index + 1, so the first row is truthy too
        return next((i + 1 for i, row in enumerate(cells(pilot)) if any(text in c for c in row)), None)

    row = await until(pilot, position, f"a row with {text!r}")
    pilot.app.screen.table.move_cursor(row=row - 1)
    await pilot.pause()


async def fill(pilot, values: dict[str, str]) -> None:
    """Type into the open form's fields (by field name); selects take one of their choices."""
    from textual.widgets import Input, Select

    for name, value in values.items():
        widget = pilot.app.screen.query_one(f"#field-{name}")
        if isinstance(widget, Select):
            widget.value = value
        else:
            assert isinstance(widget, Input)
            widget.value = value
    await pilot.pause()


def make_key(stack, name: str, **fields) -> dict:
    """A key made through the admin API (the gateway accepts it at once)."""
    import httpx

    return httpx.post(f"{stack.root}/admin/keys", json={"name": name, **fields},
                      headers={"Authorization": f"Bearer {stack.admin_key}"}).raise_for_status().json()


def loaded(pilot) -> bool:
    """The current view's first load arrived: its heading counts the rows (an empty list too)."""
    return "[" in str(pilot.app.screen.query_one("#heading").content)


class Terminal:
    """A command in a real pseudo-terminal (140x40, xterm-256color), read through a terminal
    emulator (pyte): what is on its screen now, and keys typed into it."""

    SIZE = (140, 40)

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        self.screen = pyte.Screen(*self.SIZE)
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, in its own terminal
            os.chdir(cwd)
            columns, lines = self.SIZE
            os.execve(argv[0], argv, {**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(lines)})

    def read(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                self.stream.feed(os.read(self.fd, 65536))
            except OSError:  # the command ended
                time.sleep(timeout)

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, *texts: str, timeout: float = 60) -> None:
        """Until everything in `texts` is on the screen."""
        deadline = time.monotonic() + timeout
        while not all(t in self.text for t in texts):
            assert time.monotonic() < deadline, \
                f"not on the screen: {[t for t in texts if t not in self.text]}; the screen:\n{self.text}"
            self.read(0.5)

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self, timeout: float = 20) -> int | None:
        """The command's exit status once it ends, None if it is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            self.read(0.2)
        return None

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)

